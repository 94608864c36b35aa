"""Checking answers under load: every response must be the one its model gives to that request alone.

    learn   send each distinct (model, request) once, one at a time (nothing else in the engine's batch), with
            greedy decoding; its text is the reference
    load    the run itself; each response's text is kept on its record
    check   per model: responses checked, the same as the reference, differing; and of those that differ,
            how many equal *another* model's reference for the same request (the answer came from the
            wrong model: the signature of a mixed-batch bug)

Engines are not batch-invariant: a token whose two best candidates are almost equally likely can flip when
the same request runs in a larger batch (the sums are done in another order, in bfloat16 on vLLM's CPU
engine). The reference is learned with `logprobs` (the best candidates at each position), so an answer that
leaves the reference exactly where it takes a candidate within `TIE_NATS` of the reference's token is counted
as a *near tie*, not as wrong. A wrong model or a wrong delta leaves the reference where the reference was
sure.

Text can hide where an answer left the reference: a tokenizer spells `80` as one token or as `8` + `0`, so an
answer that took the runner-up `8` still reads like the reference for a while and leaves it later, where the
reference was sure. So when the requests ask vLLM for their token ids (`return_token_ids`, as `compare` and
`run --token-ids` do), answers are compared token by token (the reference is learned with
`return_tokens_as_token_ids`); otherwise by text.

A request's identity is its body without `model` and `stream` (so a streamed and a non-streamed copy of a
request share one reference). Only greedy requests (temperature 0) can be checked.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.harness.parse import choice_text

#: Largest gap (in log-probability, nats) below the best token at which taking another one is a near tie.
#: vLLM runs a float32 checkpoint in bfloat16 on the CPU ("Downcasting torch.float32 to torch.bfloat16"):
#: a larger batch rounds differently, and flips of up to ~0.06 nats were seen with vLLM's own LoRA ops.
TIE_NATS = 0.1
#: Candidates asked for at each step of a reference (OpenAI allows up to 20).
TOP_LOGPROBS = 5


@dataclass(frozen=True, slots=True)
class Step:
    """One generated token of a reference: its text, the runner-up's text, and how far behind it was;
    `others`: the further candidates and their gaps."""

    token: str
    alt: str | None
    gap: float
    others: tuple[tuple[str, float], ...] = ()

    def candidates(self, tie_nats: float) -> list[str]:
        """The other tokens within `tie_nats` of this one."""
        out = [self.alt] if self.alt is not None and self.gap <= tie_nats else []
        return out + [t for t, g in self.others if g <= tie_nats]


@dataclass(frozen=True, slots=True)
class Reference:
    text: str
    steps: tuple[Step, ...] = ()
    token_ids: tuple[int, ...] | None = None  # with return_token_ids; steps then name tokens "token_id:N"

    def divergence(self, ids: Sequence[int]) -> tuple[int, Step | None] | None:
        """Where the token ids `ids` first leave this reference, and the reference's step there."""
        assert self.token_ids is not None
        k = next((i for i, (a, b) in enumerate(zip(self.token_ids, ids, strict=False)) if a != b), None)
        if k is None:
            return None
        return k, self.steps[k] if k < len(self.steps) else None

    def near_tie_ids(self, ids: Sequence[int], tie_nats: float = TIE_NATS) -> bool:
        """Do the token ids `ids` leave this reference by taking a runner-up within `tie_nats`?"""
        return self._near_tie_at(self.divergence(ids), ids, tie_nats)

    @staticmethod
    def _near_tie_at(d: tuple[int, Step | None] | None, ids: Sequence[int], tie_nats: float) -> bool:
        if d is None or d[1] is None:
            return False
        k, step = d
        return k < len(ids) and f"token_id:{ids[k]}" in step.candidates(tie_nats)

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
        for alt in step.candidates(tie_nats):
            if is_special(alt):  # the candidate was to stop here
                if pos == len(text):
                    return True
            elif text.startswith(alt, pos):
                return True
        return False


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
            rest = [(x["token"], t["logprob"] - x["logprob"]) for x in tops if x["token"] != t["token"]]
            out.append(_step(t["token"], rest))
    elif isinstance(lp.get("tokens"), list):
        for token, logprob, tops in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=False):
            others = sorted(((v, k) for k, v in (tops or {}).items() if k != token), reverse=True)
            out.append(_step(token, [(k, logprob - v) for v, k in others]))
    return tuple(out)


def _step(token: str, rest: list[tuple[str, float]]) -> Step:
    if not rest:
        return Step(token, None, float("inf"))
    return Step(token, rest[0][0], rest[0][1], tuple(rest[1:]))


def reference_body(body: bytes | dict[str, Any]) -> dict[str, Any]:
    """The learning request: the same body, not streamed, asking for the two best tokens at each step."""
    data = json.loads(body) if isinstance(body, bytes | str) else dict(body)
    data.pop("stream", None)
    data.pop("stream_options", None)
    if data.get("return_token_ids"):
        data["return_tokens_as_token_ids"] = True  # logprobs name tokens by id: compared token by token
    if "messages" in data:
        data["logprobs"], data["top_logprobs"] = True, TOP_LOGPROBS
    else:
        data["logprobs"] = TOP_LOGPROBS
    return data


async def learn_one(client: httpx.AsyncClient, url: str, body: bytes | dict[str, Any]) -> Reference:
    """POST the learning request to `url` (a full route URL); its answer is the reference."""
    r = await client.post(url, json=reference_body(body))
    if r.status_code != 200:
        raise RuntimeError(f"verify: the reference request failed with {r.status_code}: {r.text[:300]}")
    choice = r.json()["choices"][0]
    ids = choice.get("token_ids")
    return Reference(choice_text(choice), steps_from(choice), tuple(ids) if isinstance(ids, list) else None)


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
    where: str | None = None  # with token ids: the first differing token, its runner-up and their gap


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

    def _answered_by(self, model: str, key: str, same: Callable[[Reference], bool]) -> str | None:
        """Another model whose reference to this request `same` accepts, if any."""
        return next((m for (m, k), ref in self.refs.items() if k == key and m != model and same(ref)), None)

    def judge(self, model: str, key: str, text: str, token_ids: Sequence[int] | None = None) -> Verdict:
        want = self.refs[(model, key)]
        if token_ids is not None and want.token_ids is not None:
            ids = tuple(token_ids)
            if ids == want.token_ids:
                return Verdict(True)
            other = self._answered_by(model, key, lambda ref: ref.token_ids == ids)
            if other is not None:
                return Verdict(False, other)
            d = want.divergence(ids)
            where = None
            if d is not None:
                k, step = d
                got = ids[k] if k < len(ids) else None
                where = f"token {k}: {got}" + (f" (reference {step.token}, runner-up {step.alt} by "
                                               f"{step.gap:.3g} nats)" if step else "")  # fmt: skip
            return Verdict(False, near_tie=want._near_tie_at(d, ids, self.tie_nats), where=where)
        if text == want.text:
            return Verdict(True)
        other = self._answered_by(model, key, lambda ref: ref.text == text)
        if other is not None:
            return Verdict(False, other)
        return Verdict(False, near_tie=want.near_tie(text, self.tie_nats))

    def check(self, model: str, key: str, text: str, token_ids: Sequence[int] | None = None) -> Verdict:
        """Judge one response and count it."""
        verdict = self.judge(model, key, text, token_ids)
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


SUMMED = ("checked", "near_ties", "wrong", "wrong_model")


def merge_summaries(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several `summary()`s (levels of a run, or repeats of one level) added up, per model too."""
    per_model: dict[str, dict[str, Any]] = {}
    for part in parts:
        for model, c in part["per_model"].items():
            m = per_model.setdefault(
                model, {"checked": 0, "right": 0, "near_ties": 0, "wrong": 0, "as_model": {}}
            )
            for key in ("checked", "right", "near_ties", "wrong"):
                m[key] += c[key]
            for other, n in c["as_model"].items():
                m["as_model"][other] = m["as_model"].get(other, 0) + n
    return {
        **{key: sum(p[key] for p in parts) for key in SUMMED},
        "per_model": per_model,
        "examples": [e for p in parts for e in p.get("examples", [])][:5],
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
