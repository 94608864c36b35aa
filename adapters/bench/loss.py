"""Cross-entropy through the LM head, in chunks of tokens, without the full fp32 logits.

A Llama-3 head has 128,256 outputs: at 8,192 tokens a step (micro-batch 4 x 2,048) the usual
``logits.float()`` + ``cross_entropy`` holds bf16 logits (2 GiB), their fp32 copy (4 GiB) and the
fp32 gradient (4 GiB) at once. ``chunked_lm_loss`` projects ``chunk`` tokens at a time, and computes
the gradient with respect to the hidden states during the forward pass (as Liger's fused linear
cross-entropy does), so what is kept for the backward pass is one bf16 tensor of the hidden
states' shape; at most one chunk's fp32 logits exist at any moment.

    loss = chunked_lm_loss(hidden[:, :-1], lm_head.weight, input_ids[:, 1:])
    loss.backward()

The loss is the mean over labels that are not ``-100``, as ``transformers``' own loss. When the
head's weight requires a gradient, it is accumulated in fp32 over the chunks.
"""

from __future__ import annotations

import functools
from typing import Any

#: fp32 logits of one chunk stay under this many bytes (512 MiB: 1,046 tokens of a 128k head).
CHUNK_BYTES = 1 << 29
IGNORE_INDEX = -100


def chunk_tokens(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits fit ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * vocab_size))


@functools.cache
def _make_function() -> Any:
    import torch

    class _ChunkedLinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, labels: Any, chunk: int) -> Any:
            n_tokens = hidden.shape[0]
            valid_all = labels != IGNORE_INDEX
            n_valid = valid_all.sum().clamp(min=1)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, n_tokens, chunk):
                h = hidden[start : start + chunk]
                y = labels[start : start + chunk]
                valid = valid_all[start : start + chunk]
                target = y.clamp(min=0)
                logits = (h @ weight.t()).float()  # (c, V)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, target[:, None]).squeeze(1)
                total += ((lse - picked) * valid).sum()
                # d(sum of losses)/d(logits) = softmax - one_hot, zero on ignored rows; in place.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(probs.shape[0], device=probs.device), target] -= 1.0
                probs.mul_(valid[:, None])
                g = probs.to(weight.dtype)
                del logits, probs
                grad_hidden[start : start + chunk] = g @ weight
                if grad_weight is not None:
                    grad_weight += (g.t() @ h).float()
            ctx.save_for_backward(grad_hidden, n_valid)
            ctx.grad_weight = grad_weight
            return total / n_valid

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            grad_hidden, n_valid = ctx.saved_tensors
            scale = grad_out / n_valid
            grad_h = grad_hidden * scale.to(grad_hidden.dtype)
            grad_w = None
            if ctx.grad_weight is not None:
                grad_w = (ctx.grad_weight * scale).to(grad_hidden.dtype)
            return grad_h, grad_w, None, None

    return _ChunkedLinearCrossEntropy


def chunked_lm_loss(hidden: Any, weight: Any, labels: Any, chunk: int | None = None) -> Any:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` (already shifted).

    ``hidden``: (..., H), ``weight``: (V, H), ``labels``: (...) with ``-100`` for ignored tokens.
    """
    function = _make_function()
    h = hidden.reshape(-1, hidden.shape[-1])
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    y = labels.reshape(-1)
    return function.apply(h, weight, y, chunk or chunk_tokens(weight.shape[0]))
