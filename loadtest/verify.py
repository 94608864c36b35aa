"""Checking answers under load: every response must be the one its model gives to that request alone.

    learn   send each distinct (model, request) once, one at a time (nothing else in the engine's batch), with
            greedy decoding; its text is the reference
    load    the run itself; each response's text is kept on its record
    check   per model: responses checked, the same as the reference, differing; and of those that differ,
            how many equal *another* model's reference for the same request (the answer came from the
            wrong model: the signature of a mixed-batch bug)

A request's identity is its body without `model` and `stream` (so a streamed and a non-streamed copy of a
request share one reference). Only greedy requests (temperature 0) can be checked.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


def request_key(body: bytes | dict[str, Any]) -> str:
    """What identifies a request's answer apart from the model: the body less model, stream and options."""
    data = json.loads(body) if isinstance(body, bytes | str) else dict(body)
    for key in ("model", "stream", "stream_options"):
        data.pop(key, None)
    return json.dumps(data, sort_keys=True)


@dataclass(slots=True)
class ModelCheck:
    """One model's checked responses."""

    checked: int = 0
    right: int = 0
    as_model: Counter[str] = field(default_factory=Counter)  # equal to another model's reference

    @property
    def wrong(self) -> int:
        return self.checked - self.right

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "right": self.right,
            "wrong": self.wrong,
            "as_model": dict(self.as_model),
        }


@dataclass(slots=True)
class Verdict:
    """`ok`: the text is the model's own reference; else `as_model` names whose reference it is, if any."""

    ok: bool
    as_model: str | None = None


class References:
    """Reference answers: (model, request key) -> text, learned one request at a time."""

    def __init__(self) -> None:
        self.texts: dict[tuple[str, str], str] = {}
        self.checks: dict[str, ModelCheck] = {}

    def add(self, model: str, key: str, text: str) -> None:
        self.texts[(model, key)] = text

    def __contains__(self, item: tuple[str, str]) -> bool:
        return item in self.texts

    def __len__(self) -> int:
        return len(self.texts)

    def models(self) -> list[str]:
        return sorted({m for m, _ in self.texts})

    def judge(self, model: str, key: str, text: str) -> Verdict:
        want = self.texts[(model, key)]
        if text == want:
            return Verdict(True)
        for (other, other_key), other_text in self.texts.items():
            if other_key == key and other != model and other_text == text:
                return Verdict(False, other)
        return Verdict(False)

    def check(self, model: str, key: str, text: str) -> Verdict:
        """Judge one response and count it."""
        verdict = self.judge(model, key, text)
        c = self.checks.setdefault(model, ModelCheck())
        c.checked += 1
        if verdict.ok:
            c.right += 1
        elif verdict.as_model is not None:
            c.as_model[verdict.as_model] += 1
        return verdict

    def summary(self) -> dict[str, Any]:
        """What results.json carries: totals and per model."""
        per_model = {m: c.to_dict() for m, c in sorted(self.checks.items())}
        return {
            "references": len(self.texts),
            "checked": sum(c.checked for c in self.checks.values()),
            "wrong": sum(c.wrong for c in self.checks.values()),
            "wrong_model": sum(sum(c.as_model.values()) for c in self.checks.values()),
            "per_model": per_model,
        }


def distinct(items: Iterable[tuple[str, str, Any]]) -> list[tuple[str, str, Any]]:
    """(model, key, payload) triples with each (model, key) once, in first-seen order."""
    seen: set[tuple[str, str]] = set()
    out = []
    for model, key, payload in items:
        if (model, key) not in seen:
            seen.add((model, key))
            out.append((model, key, payload))
    return out
