"""`GroupedPunicaWrapperCPU`: vLLM's CPU punica wrapper with the grouped ops of `lora_ops.py`.

vLLM asks the platform for its punica wrapper by qualified name (`CpuPlatform.get_punica_wrapper`); the plugin
points that at this class. Each engine step vLLM calls `update_metadata` once, then the layers call the
`add_*` methods (several per decoder layer): the rows are grouped by adapter once per step, here, and every
op of the step reuses the groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from engine_plugin import compiled, lora_ops


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._token_groups: lora_ops.Groups = []
        self._token_gather: lora_ops.Gather | None = None  # many small groups: one batched product instead
        self._sampler_groups: lora_ops.Groups = []
        self._weights: lora_ops.WeightCache = {}  # per LoRA layer: its stacks laid out for GEMMs
        self._nonzero: lora_ops.NonzeroCache = {}  # embedding and lm_head stacks: their slots with weights
        self._slot_ids: tuple[object, ...] | None = None  # the adapter in each slot (vLLM's lora_index_to_id)
        self._key = compiled.register(self)  # how the operators find this wrapper

    def update_metadata(self, mapping: Any, lora_index_to_id: Any, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(mapping, lora_index_to_id, *args, **kwargs)
        self._slot_ids = tuple(lora_index_to_id)
        self._token_groups = lora_ops.group_rows(self.token_lora_indices)
        self._token_gather = lora_ops.gather_plan(self.token_lora_indices, self._token_groups)
        self._sampler_groups = lora_ops.group_rows(self.sampler_indices)

    # What vLLM's LoRA layers call: traced by Dynamo, one operator each; eagerly, the `lora_*` method.

    def add_shrink(  # type: ignore[override]
        self,
        y: tuple[torch.Tensor, ...] | torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        scale: float,
        **kwargs: Any,
    ) -> None:
        x = x.view(-1, x.shape[-1])
        if not torch.compiler.is_compiling():
            self.lora_shrink(y, x, lora_a_stacked, scale)
        elif isinstance(y, torch.Tensor):
            torch.ops.lora_gateway.shrink(y, x, list(lora_a_stacked), scale, self._key)
        else:  # one output tensor per slice: one operator per slice
            for out, a in zip(y, lora_a_stacked, strict=True):
                torch.ops.lora_gateway.shrink(out, x, [a], scale, self._key)

    def add_expand(  # type: ignore[override]
        self,
        y: torch.Tensor,
        x: tuple[torch.Tensor, ...] | torch.Tensor,
        lora_b_stacked: tuple[torch.Tensor, ...],
        output_slices: tuple[int, ...],
        offset_start: int = 0,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        ins = (x,) if isinstance(x, torch.Tensor) and x.dim() == 2 else x
        if not torch.compiler.is_compiling():
            self.lora_expand(y, ins, lora_b_stacked, output_slices, offset_start, add_inputs)
        else:
            torch.ops.lora_gateway.expand(
                y, list(ins), list(lora_b_stacked), list(output_slices), offset_start, add_inputs, self._key
            )

    def add_lora_embedding(  # type: ignore[override]
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        if not torch.compiler.is_compiling():
            self.lora_embedding(y, x, lora_b_stacked)
        else:
            torch.ops.lora_gateway.embedding(y, x, lora_b_stacked, self._key)

    def add_lora_linear(  # type: ignore[override]
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        if not torch.compiler.is_compiling():
            self.lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices)
        else:
            torch.ops.lora_gateway.linear(
                y, x, list(lora_a_stacked), list(lora_b_stacked), scale, list(output_slices), self._key
            )

    # The grouped ops with this step's groups (and, for linear layers, the cached weight layouts).

    def lora_shrink(
        self,
        y: Sequence[torch.Tensor] | torch.Tensor,
        x: torch.Tensor,
        lora_a: Sequence[torch.Tensor],
        scale: float,
    ) -> None:
        """`y`: one output per slice (a tuple, or a slices x tokens x rank tensor), or a tokens x rank one."""
        outs = (y,) if isinstance(y, torch.Tensor) and y.dim() == 2 else y
        lora_ops.lora_shrink(outs, x, lora_a, scale, self._token_groups)

    def lora_expand(
        self,
        y: torch.Tensor,
        x: Sequence[torch.Tensor],
        lora_b: Sequence[torch.Tensor],
        output_slices: Sequence[int],
        offset_start: int,
        add_inputs: bool,
    ) -> None:
        lora_ops.lora_expand(y, x, lora_b, output_slices, self._token_groups, offset_start, add_inputs)

    def lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor) -> None:
        lora_ops.lora_embedding(y, x, lora_b, self._token_groups, self._nonzero)

    def lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a: Sequence[torch.Tensor],
        lora_b: Sequence[torch.Tensor],
        scale: float,
        output_slices: Sequence[int],
    ) -> None:
        lora_ops.lora_linear(
            y,
            x,
            lora_a,
            lora_b,
            scale,
            output_slices,
            self._token_groups,
            cache=self._weights,
            ids=self._slot_ids,
            gather=self._token_gather,
        )

    def add_lora_logits(  # type: ignore[override]
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        y2 = y.view(-1, y.shape[-1])
        lora_ops.lora_logits(
            y2,
            x.view(-1, x.shape[-1]),
            lora_a_stacked,
            lora_b_stacked,
            scale,
            self._sampler_groups,
            self._nonzero,
        )
