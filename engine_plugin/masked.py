"""vLLM's own CPU LoRA ops, corrected only where they are wrong: rows with index -1 get no delta.

The `fix` mode of the plugin. Each `bgmv_*` op runs vLLM's implementation on the rows that name an adapter
(no product is spent on the others) and leaves base-model rows as a correct kernel leaves them: untouched
where the op adds, zero where it assigns. The `sgmv_*` (prefill) ops call the `bgmv_*` ones through their
module, so patching `vllm.lora.ops.torch_ops.lora_ops` and the names `punica_cpu` imported from it covers
all six.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_ALL_OPS = (*OPS, "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def _written_columns(name: str, out: torch.Tensor, args: tuple[Any, ...], width: int) -> slice:
    if name == "bgmv_expand_slice":
        offset, size = int(args[0]), int(args[1])
        return slice(offset, offset + size)
    return slice(0, min(width, out.shape[1]))


def masked(name: str, op: Callable[..., None]) -> Callable[..., None]:
    """Wrap one of vLLM's `bgmv_*` ops so that rows with index -1 are skipped."""
    adds_by_default = name != "bgmv_shrink"

    @functools.wraps(op)
    def run(
        inputs: torch.Tensor,
        weights: torch.Tensor,
        out: torch.Tensor,
        indices: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        keep = indices >= 0
        if inputs.shape[0] != out.shape[0] or bool(keep.all()):
            op(inputs, weights, out, indices, *args, **kwargs)
            return
        rows = keep.nonzero().squeeze(1)
        if "add_inputs" in kwargs:
            adds = adds_by_default and bool(kwargs["add_inputs"])
        else:
            adds = adds_by_default and (bool(args[-1]) if len(args) in (1, 3) else True)
        width = weights.shape[-2]
        cols = _written_columns(name, out, args, width)
        if rows.numel():
            part = out.index_select(0, rows)
            op(inputs.index_select(0, rows), weights, part, indices.index_select(0, rows), *args, **kwargs)
            out.index_copy_(0, rows, part)
        if not adds:
            out[~keep, cols] = 0

    run.lora_gateway_masked = True  # type: ignore[attr-defined]
    return run


def install() -> list[str]:
    """Patch vLLM's CPU LoRA ops in place; return the names patched (none if done already)."""
    from vllm.lora.ops.torch_ops import lora_ops as torch_lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    patched = []
    for name in OPS:
        original = getattr(torch_lora_ops, name)
        if getattr(original, "lora_gateway_masked", False):
            continue
        fixed = masked(name, original)
        setattr(torch_lora_ops, name, fixed)
        if getattr(punica_cpu, name, None) is original:
            setattr(punica_cpu, name, fixed)
        patched.append(name)
    return patched
