"""Held-out evaluation: base vs adapter in process, or any model behind an OpenAI-compatible endpoint.

In process (`evaluate_model`, `compare_base_adapter`): mean negative log-likelihood of the reference
completion (its tokens only) and its perplexity, always; with greedy decoding, exact match (after
stripping surrounding whitespace) and token F1 (bag of word and punctuation tokens, SQuAD style).

Through a server (`evaluate_endpoint`): the same exact match and token F1, greedy (temperature 0), over
`/v1/chat/completions` for chat data and `/v1/completions` for prompt/completion data. This is how the
demo adapters' numbers are reproduced through the gateway::

    lora-gateway evaluate --url http://localhost:8000 --model demo-a \
        --data adapters/datasets/sql/held_out.jsonl

Heavy imports (torch) happen inside the functions; `evaluate_endpoint` needs only httpx.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from adapters.data import JsonlDataset, split_prompt

if TYPE_CHECKING:
    import httpx

_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    return _WORD.findall(text)


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the word/punctuation tokens shared by prediction and reference (1.0 when both are empty)."""
    pred, ref = word_tokens(prediction), word_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


@dataclass
class EvalResult:
    """Scores of one model on one held-out set; `None` where a score was not computed."""

    examples: int
    loss: float | None = None
    perplexity: float | None = None
    exact_match: float | None = None
    token_f1: float | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_generations(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """(exact match rate, mean token F1) of predictions against references."""
    n = max(len(references), 1)
    em = sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / n
    f1 = sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True)) / n
    return em, f1


# --------------------------------------------------------------------------- in process


def _prompt_text(tokenizer: Any, prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _completion_text(tokenizer: Any, prompt: Any, completion: str) -> str:
    """The completion as the model is trained on it: chat answers end with the template's end of turn."""
    if isinstance(prompt, str):
        return completion + (tokenizer.eos_token or "")
    full = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": completion}], tokenize=False
    )
    return full[len(_prompt_text(tokenizer, prompt)) :]


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def completion_loss(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[Any, str]], batch_size: int = 16
) -> float:
    """Mean NLL per completion token of the references, given their prompts."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in _batches(pairs, batch_size):
        ids, labels = [], []
        for prompt, completion in batch:
            p = tokenizer(_prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
            c = tokenizer(_completion_text(tokenizer, prompt, completion), add_special_tokens=False)[
                "input_ids"
            ]
            ids.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        label_ids = torch.tensor([y + [-100] * (width - len(y)) for y in labels], device=device)
        attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        shift_logits, shift_labels = logits[:, :-1], label_ids[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += int((shift_labels != -100).sum().item())
    return total / max(count, 1)


def generate_greedy(
    model: Any, tokenizer: Any, prompts: Sequence[Any], max_new_tokens: int = 64, batch_size: int = 16
) -> list[str]:
    """Greedy completions of the prompts (chat prompts through the chat template), special tokens removed."""
    import torch

    device = next(model.parameters()).device
    out: list[str] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for batch in _batches(prompts, batch_size):
            texts = [_prompt_text(tokenizer, p) for p in batch]
            enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
            with torch.no_grad():
                generated = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            width = enc["input_ids"].shape[1]
            out += [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in generated]
    finally:
        tokenizer.padding_side = old_side
    return out


def evaluate_model(
    model: Any,
    tokenizer: Any,
    dataset: JsonlDataset,
    *,
    generate: bool = True,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    keep_samples: int = 5,
) -> EvalResult:
    """Loss/perplexity of the references and (when `generate`) greedy exact match and token F1."""
    was_training = model.training
    model.eval()
    try:
        pairs = [split_prompt(row, dataset.format) for row in dataset.rows]
        loss = completion_loss(model, tokenizer, pairs, batch_size)
        result = EvalResult(examples=len(pairs), loss=loss, perplexity=math.exp(min(loss, 50.0)))
        if generate:
            predictions = generate_greedy(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size)
            references = [c for _, c in pairs]
            result.exact_match, result.token_f1 = score_generations(predictions, references)
            result.samples = [
                {"prompt": _short(p), "reference": r, "prediction": o}
                for (p, r), o in zip(pairs[:keep_samples], predictions[:keep_samples], strict=True)
            ]
    finally:
        model.train(was_training)
    return result


def _short(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def compare_base_adapter(
    peft_model: Any, tokenizer: Any, dataset: JsonlDataset, **kwargs: Any
) -> dict[str, dict[str, Any]]:
    """Base (adapter disabled) and adapter side by side on the same held-out set."""
    with peft_model.disable_adapter():
        base = evaluate_model(peft_model, tokenizer, dataset, **kwargs)
    adapter = evaluate_model(peft_model, tokenizer, dataset, **kwargs)
    return {"base": base.as_dict(), "adapter": adapter.as_dict()}


# --------------------------------------------------------------------------- through a server


def evaluate_endpoint(
    base_url: str,
    model: str,
    dataset: JsonlDataset,
    *,
    api_key: str | None = None,
    max_tokens: int = 64,
    timeout: float = 60.0,
    keep_samples: int = 5,
    transport: httpx.BaseTransport | None = None,
) -> EvalResult:
    """Exact match and token F1 of `model` served at `base_url` (OpenAI API, greedy decoding)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    root = base_url.rstrip("/")
    if not root.endswith("/v1"):
        root += "/v1"
    pairs = [split_prompt(row, dataset.format) for row in dataset.rows]
    predictions: list[str] = []
    with httpx.Client(headers=headers, timeout=timeout, transport=transport) as client:
        for prompt, _ in pairs:
            predictions.append(_complete(client, root, model, prompt, max_tokens))
    references = [c for _, c in pairs]
    em, f1 = score_generations(predictions, references)
    samples = [
        {"prompt": _short(p), "reference": r, "prediction": o}
        for (p, r), o in zip(pairs[:keep_samples], predictions[:keep_samples], strict=True)
    ]
    return EvalResult(examples=len(pairs), exact_match=em, token_f1=f1, samples=samples)


def _complete(client: httpx.Client, root: str, model: str, prompt: Any, max_tokens: int) -> str:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0.0}
    if isinstance(prompt, str):
        response = client.post(f"{root}/completions", json={**body, "prompt": prompt})
        response.raise_for_status()
        return (response.json()["choices"][0].get("text") or "").strip()
    response = client.post(f"{root}/chat/completions", json={**body, "messages": prompt})
    response.raise_for_status()
    return (response.json()["choices"][0]["message"].get("content") or "").strip()
