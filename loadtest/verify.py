"""Checking answers under load: every response must be the one its model gives to that request alone.

    learn   send each distinct (model, request) once, one at a time (nothing else in the engine's batch), with
            greedy decoding; its text is the reference
    load    the run itself; each response's text is kept on its record
    check   per model: responses checked, the same as the reference, differing; and of those that differ,
            how many equal *another* model's reference for the same request (the answer came from the
            wrong model: the signature of a mixed-batch bug)

Engines are not batch-invariant: a token whose two best candidates are almost equally likely can flip when
the same request runs in a larger batch (the sums are done in another order). The reference is learned with
`logprobs` (the two best candidates at each position), so an answer that leaves the reference exactly where
it takes the reference's second candidate, and the two were within `TIE_NATS` of each other, is counted as
a *near tie*, not as wrong. A wrong model or a wrong delta leaves the reference where the reference was sure.

A request's identity is its body without `model` and `stream` (so a streamed and a non-streamed copy of a
request share one reference). Only greedy requests (temperature 0) can be checked.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

#: Largest gap (in log-probability, nats) between the two best tokens at which a flip is a near tie.
TIE_NATS = 0.05


@dataclass(frozen=True, slots=True)
class Step:
    """One generated token of a reference: its text, the runner-up's text, and how far behind it was."""

    token: str
    alt: str | None
    gap: float


@dataclass(frozen=True, slots=True)
class Reference:
    text: str
    steps: tuple[Step, ...] = ()

    def near_tie(self, text: str, tie_nats: float = TIE_NATS) -> bool:
        """Does `text` leave this reference by taking a runner-up that was within `tie_nats`?

        Special tokens (`</s>`, `<|eot_id|>`) are not in the text: they take no room, and the last one is
        where the reference stopped.
        """
        pos = 0
        last = len(self.steps) - 1
        for i, step in enumerate(self.steps):
            if is_special(step.token):
                if i == last and pos < len(text):  # the reference stopped here; the answer went on
                    return self._took_runner_up(step, text, pos, tie_nats)
                continue
            if step.token and text.startswith(step.token, pos):
                pos += len(step.token)
                continue
            return self._took_runner_up(step, text, pos, tie_nats)
        return False

    @staticmethod
    def _took_runner_up(step: Step, text: str, pos: int, tie_nats: float) -> bool:
        if step.alt is None or step.gap > tie_nats:
            return False
        if is_special(step.alt):  # the runner-up was to stop here
            return pos == len(text)
        return text.startswith(step.alt, pos)


def is_special(token: str) -> bool:
    """`</s>`, `<|eot_id|>` and the like: tokens a detokenizer leaves out of the text."""
    return len(token) > 2 and token[0] == "<" and token[-1] == ">" and " " not in token


def steps_from(choice: dict[str, Any]) -> tuple[Step, ...]:
    """The steps of a chat (`logprobs.content`) or completions (`logprobs.tokens`) choice."""
    lp = choice.get("logprobs") or {}
    out = []
    if isinstance(lp.get("content"), list):
        for t in lp["content"]:
            tops = sorted(t.get("top_logprobs") or [], key=lambda x: -x["logprob"])
            alt = next((x for x in tops if x["token"] != t["token"]), None)
            gap = t["logprob"] - alt["logprob"] if alt else float("inf")
            out.append(Step(t["token"], alt["token"] if alt else None, gap))
    elif isinstance(lp.get("tokens"), list):
        for token, logprob, tops in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=False):
            others = sorted(((v, k) for k, v in (tops or {}).items() if k != token), reverse=True)
            alt = others[0] if others else None
            out.append(Step(token, alt[1] if alt else None, logprob - alt[0] if alt else float("inf")))
    return tuple(out)


def reference_body(body: bytes | dict[str, Any]) -> dict[str, Any]:
    """The learning request: the same body, not streamed, asking for the two best tokens at each step."""
    data = json.loads(body) if isinstance(body, bytes | str) else dict(body)
    data.pop("stream", None)
    data.pop("stream_options", None)
    if "messages" in data:
        data["logprobs"], data["top_logprobs"] = True, 2
    else:
        data["logprobs"] = 2
    return data


async def learn_one(client: httpx.AsyncClient, url: str, body: bytes | dict[str, Any]) -> Reference:
    """POST the learning request to `url` (a full route URL); its answer is the reference."""
    r = await client.post(url, json=reference_body(body))
    if r.status_code != 200:
        raise RuntimeError(f"verify: the reference request failed with {r.status_code}: {r.text[:300]}")
    choice = r.json()["choices"][0]
    message = choice.get("message")
    text = (message.get("content") if isinstance(message, dict) else choice.get("text")) or ""
    return Reference(text, steps_from(choice))


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
    near_ties: int = 0
    as_model: Counter[str] = field(default_factory=Counter)  # equal to another model's reference

    @property
    def wrong(self) -> int:
        return self.checked - self.right - self.near_ties

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "right": self.right,
            "near_ties": self.near_ties,
            "wrong": self.wrong,
            "as_model": dict(self.as_model),
        }


@dataclass(slots=True)
class Verdict:
    """`ok`: the text is the model's own reference; else `as_model` names whose reference it is, if any."""

    ok: bool
    as_model: str | None = None
    near_tie: bool = False


class References:
    """Reference answers: (model, request key) -> `Reference`, learned one request at a time."""

    def __init__(self, tie_nats: float = TIE_NATS) -> None:
        self.refs: dict[tuple[str, str], Reference] = {}
        self.checks: dict[str, ModelCheck] = {}
        self.tie_nats = tie_nats

    def fresh(self) -> References:
        """The same references with no responses counted yet (one per level)."""
        other = References(self.tie_nats)
        other.refs = self.refs
        return other

    def add(self, model: str, key: str, ref: Reference | str) -> None:
        self.refs[(model, key)] = ref if isinstance(ref, Reference) else Reference(ref)

    def text(self, model: str, key: str) -> str:
        return self.refs[(model, key)].text

    def __contains__(self, item: tuple[str, str]) -> bool:
        return item in self.refs

    def __len__(self) -> int:
        return len(self.refs)

    def models(self) -> list[str]:
        return sorted({m for m, _ in self.refs})

    def judge(self, model: str, key: str, text: str) -> Verdict:
        want = self.refs[(model, key)]
        if text == want.text:
            return Verdict(True)
        for (other, other_key), other_ref in self.refs.items():
            if other_key == key and other != model and other_ref.text == text:
                return Verdict(False, other)
        return Verdict(False, near_tie=want.near_tie(text, self.tie_nats))

    def check(self, model: str, key: str, text: str) -> Verdict:
        """Judge one response and count it."""
        verdict = self.judge(model, key, text)
        c = self.checks.setdefault(model, ModelCheck())
        c.checked += 1
        if verdict.ok:
            c.right += 1
        elif verdict.near_tie:
            c.near_ties += 1
        elif verdict.as_model is not None:
            c.as_model[verdict.as_model] += 1
        return verdict

    def summary(self) -> dict[str, Any]:
        """What results.json carries: totals and per model."""
        per_model = {m: c.to_dict() for m, c in sorted(self.checks.items())}
        return {
            "references": len(self.refs),
            "tie_nats": self.tie_nats,
            "checked": sum(c.checked for c in self.checks.values()),
            "near_ties": sum(c.near_ties for c in self.checks.values()),
            "wrong": sum(c.wrong for c in self.checks.values()),
            "wrong_model": sum(sum(c.as_model.values()) for c in self.checks.values()),
            "per_model": per_model,
        }


async def learn_all(
    client: httpx.AsyncClient, requests: Sequence[tuple[str, str, bytes | dict[str, Any]]], refs: References
) -> int:
    """Learn each (model, url, body) that `refs` lacks, one at a time; return how many were sent."""
    sent = 0
    for model, url, body in requests:
        key = request_key(body)
        if (model, key) in refs:
            continue
        refs.add(model, key, await learn_one(client, url, body))
        sent += 1
    return sent
