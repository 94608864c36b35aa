"""What to send: models drawn under a mix, synthetic prompts of about P tokens, arrival schedules.

Everything is deterministic for a given seed, so two runs (or the direct and gateway halves of an
overhead run) send the same requests.

The prompt is made of common short English words, each about one token for BPE tokenizers, plus
a per-request number at the front so prompts never share a long prefix (prefix caching would
otherwise flatter TTFT). The token count is approximate; reports use ``usage.prompt_tokens``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Endpoint = Literal["chat", "completions"]

PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

_WORD_TEXT = (
    "the of and to in is was for on are with as his they be at one have this from or had by word "
    "but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see "
    "him two has look more day could go come did number sound no most people my over know water "
    "than call first who may down side been now find any new work part take get place made live "
    "where after back little only round man year came show every good me give our under name very "
    "through just form great think say help low line turn cause much mean before move right boy "
    "old too same tell does set three want air well also play small end put home read hand port "
    "large spell add even land here must big high such follow act why ask men change went light"
)
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """The shape of a workload. ``mix`` is ``uniform`` or ``zipf:S`` (S > 0; rank 1 is ``models[0]``)."""

    models: Sequence[str]
    mix: str = "uniform"
    prompt_tokens: int = 128
    max_tokens: int = 64
    stream: bool = False
    endpoint: Endpoint = "chat"
    seed: int = 0
    ignore_eos: bool = False
    temperature: float | None = 0.0
    extra_body: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: give at least one model name")
        if self.prompt_tokens < 1:
            raise ValueError(f"prompt_tokens: must be >= 1, got {self.prompt_tokens}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if self.endpoint not in PATHS:
            raise ValueError(f"endpoint: must be one of {sorted(PATHS)}, got {self.endpoint!r}")
        mix_weights(self.mix, len(self.models))  # validates the mix


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request ready to send: ``body`` is the encoded JSON."""

    index: int
    model: str
    path: str
    body: bytes
    stream: bool


def mix_weights(mix: str, n: int) -> list[float]:
    """Normalised weights of ``n`` models under ``uniform`` or ``zipf:S``."""
    if n < 1:
        raise ValueError("mix: need at least one model")
    name, _, arg = mix.strip().partition(":")
    if name == "uniform" and not arg:
        raw = [1.0] * n
    elif name == "zipf":
        try:
            s = float(arg)
        except ValueError:
            raise ValueError(f"mix: zipf needs an exponent, as in zipf:1.1, got {mix!r}") from None
        if s <= 0:
            raise ValueError(f"mix: zipf exponent must be > 0, got {s}")
        raw = [1.0 / (rank**s) for rank in range(1, n + 1)]
    else:
        raise ValueError(f"mix: expected 'uniform' or 'zipf:S', got {mix!r}")
    total = sum(raw)
    return [w / total for w in raw]


def synthetic_prompt(rng: random.Random, n_tokens: int, index: int) -> str:
    """About ``n_tokens`` tokens of words, starting with a unique request number."""
    words = [f"{index}:"] + rng.choices(_WORDS, k=max(0, n_tokens - 1))
    return " ".join(words)


def build_body(spec: WorkloadSpec, model: str, prompt: str) -> dict[str, object]:
    body: dict[str, object] = {"model": model, "max_tokens": spec.max_tokens}
    if spec.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if spec.temperature is not None:
        body["temperature"] = spec.temperature
    if spec.ignore_eos:
        body["ignore_eos"] = True  # vLLM extension: always generate max_tokens
    if spec.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    body.update(spec.extra_body)
    return body


def generate(spec: WorkloadSpec, n: int) -> list[RequestSpec]:
    """``n`` requests, deterministic for ``spec.seed``."""
    rng = random.Random(spec.seed)
    models = list(spec.models)
    chosen = rng.choices(models, weights=mix_weights(spec.mix, len(models)), k=n)
    path = PATHS[spec.endpoint]
    out = []
    for i, model in enumerate(chosen):
        body = build_body(spec, model, synthetic_prompt(rng, spec.prompt_tokens, i))
        out.append(RequestSpec(i, model, path, json.dumps(body).encode(), spec.stream))
    return out


def poisson_schedule(rate: float, n: int, seed: int = 0) -> list[float]:
    """Send times (seconds from 0) of ``n`` Poisson arrivals at ``rate`` per second.

    The first request leaves at 0; gaps are exponential with mean ``1 / rate``, as in
    ``vllm bench serve --request-rate`` (burstiness 1).
    """
    if rate <= 0:
        raise ValueError(f"rate: must be > 0, got {rate}")
    rng = random.Random(seed ^ 0x5EED)
    t = 0.0
    times = []
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times
