"""Eval-gated promotion: move an adapter's name to a new version only when it measurably beats the old one.

    lora-gateway adapters promote sql@4 --eval held_out.jsonl --min-gain 0.02

1. Ask the gateway what `sql` resolves to now (the current version: the alias, the newest version, or
   during a canary the version with the largest weight) and which base it is served on.
2. Score, through the gateway's own OpenAI API and greedy decoding (`adapters/evaluate.py`
   `evaluate_endpoint`: exact match and token F1), the candidate `sql@4`, the current version `sql@3`
   and the base model, on the same held-out rows.
3. Store the scores on the candidate's version (and the current version's own on it), where
   `GET /admin/adapters/sql` shows them, whatever the outcome.
4. Move the alias to 4 only if candidate - current >= `min_gain` on the chosen metric; otherwise change
   no routing and say why. A candidate that does not beat the base by the margin either is refused too:
   an adapter no better than no adapter is not worth serving.

Everything goes through HTTP (the admin API and /v1), so it works against a gateway on another machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from adapters.data import load_jsonl
from adapters.evaluate import EvalResult, evaluate_endpoint
from gateway.admin_client import AdminError, call

METRICS = ("exact_match", "token_f1")


@dataclass
class Promotion:
    """What one `promote --eval` measured and decided."""

    name: str
    candidate: int
    current: int | None
    base: str
    metric: str
    min_gain: float
    scores: dict[str, EvalResult] = field(default_factory=dict)  # "candidate" | "current" | "base"
    promoted: bool = False
    reason: str = ""

    def score(self, which: str) -> float | None:
        result = self.scores.get(which)
        value = getattr(result, self.metric) if result is not None else None
        return float(value) if value is not None else None


def split_model(model: str) -> tuple[str, int]:
    """`sql@4` -> ("sql", 4); ValueError otherwise."""
    name, at, version = model.rpartition("@")
    if not at or not name or not version.isdigit():
        raise ValueError(f"{model!r}: expected NAME@VERSION, as in sql@4")
    return name, int(version)


def decide(candidate: float, current: float | None, base: float | None, min_gain: float) -> tuple[bool, str]:
    """Promote only when the candidate beats the current version (and the base) by `min_gain`."""
    for what, other in (("the current version", current), ("the base model", base)):
        if other is not None and candidate - other < min_gain:
            gain = candidate - other
            return False, f"{candidate:.4f} vs {what}'s {other:.4f}: gain {gain:+.4f} < {min_gain}"
    against, reference = ("the current version", current) if current is not None else ("the base", base)
    by = f" by {candidate - reference:+.4f}" if reference is not None else ""
    return True, f"{candidate:.4f} beats {against}{by} (at least {min_gain} needed)"


def promote_with_eval(
    url: str,
    admin_token: str | None,
    api_key: str | None,
    model: str,
    data: Path,
    *,
    metric: str = "token_f1",
    min_gain: float = 0.02,
    max_tokens: int = 64,
    progress: Callable[[str], None] = lambda _: None,
) -> Promotion:
    """Evaluate `model` (`name@N`) against what its name serves now and the base; promote if better.
    Raises `AdminError` for the gateway's refusals, ValueError for bad arguments."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}")
    name, candidate = split_model(model)
    adapter = call(url, admin_token, "GET", f"/admin/adapters/{quote(name, safe='')}")
    ready = {v["version"] for v in adapter["versions"] if v["status"] == "ready"}
    if candidate not in ready:
        raise AdminError(f"{name} has no ready version {candidate}.", "version_not_found", "version")
    current = adapter.get("current_version")
    current = None if current == candidate else current
    base = _base_name(url, api_key, name)
    dataset = load_jsonl(data)
    promotion = Promotion(name, candidate, current, base, metric, min_gain)
    runs = [("candidate", f"{name}@{candidate}")]
    if current is not None:
        runs.append(("current", f"{name}@{current}"))
    runs.append(("base", base))
    for which, served in runs:
        progress(f"evaluating {served} ({which}) on {len(dataset.rows)} rows of {data.name}")
        result = evaluate_endpoint(url, served, dataset, api_key=api_key, max_tokens=max_tokens)
        promotion.scores[which] = result
        progress(f"  {served}: exact_match {result.exact_match:.4f}, token_f1 {result.token_f1:.4f}")
    cand_score = promotion.score("candidate")
    assert cand_score is not None
    promotion.promoted, promotion.reason = decide(
        cand_score, promotion.score("current"), promotion.score("base"), min_gain
    )
    _store(url, admin_token, promotion, data, "candidate", candidate)
    if current is not None:
        _store(url, admin_token, promotion, data, "current", current)
    if promotion.promoted:
        call(
            url,
            admin_token,
            "PUT",
            f"/admin/adapters/{quote(name, safe='')}/alias",
            body={"version": candidate},
        )
    return promotion


def _base_name(url: str, api_key: str | None, name: str) -> str:
    """The base model `name` is served on: its card's `parent` in /v1/models (with the inference key)."""
    for card in call(url, api_key, "GET", "/v1/models").get("data", []):
        if card.get("id") == name and card.get("parent"):
            return str(card["parent"])
    raise AdminError(f"{name} is not among the models this API key may call.", "model_not_found", "model")


def _store(url: str, token: str | None, p: Promotion, data: Path, which: str, version: int) -> None:
    result = p.scores[which]
    compared = {
        other: {m: getattr(r, m) for m in METRICS} | {"examples": r.examples}
        for other, r in p.scores.items()
        if other != which
    }
    body: dict[str, Any] = {
        "dataset": data.name,
        "metric": p.metric,
        "score": getattr(result, p.metric),
        "scores": {m: getattr(result, m) for m in METRICS} | {"examples": result.examples},
        "compared": compared,
        "decision": ("promoted: " if p.promoted else "not promoted: ") + p.reason
        if which == "candidate"
        else f"compared with {p.name}@{p.candidate}",
    }
    path = f"/admin/adapters/{quote(p.name, safe='')}/versions/{version}/evaluation"
    call(url, token, "PUT", path, body=body)
