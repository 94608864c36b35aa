"""Chaos clients: N clients looping over base and adapter models, streaming and not, every answer judged.

    plan = chaos_plan(["tiny-llama", "demo-a", "demo-b"])         # (model, body) pairs, greedy
    await learn_references(http, url, plan, refs)                   # each model's answer alone
    outcomes = await run_clients(url, plan, refs, clients=24, stop=event.is_set)
    summary = summarize(outcomes, kill_at=...); problems = violations(summary)

Each request ends as one outcome ``kind``:

    right      HTTP 200 and the text is the model's own reference (a stream: ended with ``[DONE]``)
    near_tie   ... left the reference where it took a runner-up within ``TIE_NATS`` (verify.py)
    wrong      HTTP 200 and any other text (another model's answer, a cut answer)
    error      an OpenAI-shaped failure: a status with ``{"error": {message, type, param, code}}``, or
               a 200 stream that ended with exactly one such error event and no ``[DONE]``
    malformed  anything else: no status (connection dropped), a body not in OpenAI's shape, a stream
               cut without an end, with several errors, or with both an error and ``[DONE]``

A request is *started* once its 200 status line reached the client (the gateway has committed to it and
can no longer send it elsewhere); a failure that was never started is an *unstarted request lost*.
Clients honour ``Retry-After`` (capped at ``backoff_s``) and pause ``backoff_s`` after other failures, as
the OpenAI SDK would, so a down engine is not answered with a busy loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from loadtest.harness.verify import References, learn_all, request_key

ERROR_KEYS = {"message", "type", "param", "code"}
PROMPTS = ("hi", "Name a colour.", "Count to five.")
PATH = "/v1/chat/completions"
Plan = Sequence[tuple[str, dict[str, Any]]]


def chaos_plan(models: Sequence[str], prompts: Sequence[str] = PROMPTS, max_tokens: int = 8) -> Plan:
    """Every (model, prompt) as a greedy chat body of exactly ``max_tokens`` tokens (``ignore_eos``)."""
    return [
        (
            m,
            {
                "model": m,
                "messages": [{"role": "user", "content": p}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        )  # fmt: skip
        for p in prompts
        for m in models
    ]


async def learn_references(http: httpx.AsyncClient, url: str, plan: Plan, refs: References) -> int:
    """Each body of ``plan`` sent alone to ``url`` (the gateway's base URL); its answer is the reference."""
    return await learn_all(http, [(m, url + PATH, body) for m, body in plan], refs)


@dataclass(slots=True)
class Outcome:
    """One request: times are seconds from the run's ``t0`` (``time.monotonic()``)."""

    client: int
    model: str
    stream: bool
    start: float
    end: float = 0.0
    kind: str = "malformed"
    status: int | None = None
    code: str | None = None  # error.code of an OpenAI-shaped error
    retry_after: str | None = None  # of a 503
    started: bool = False
    detail: str | None = None

    @property
    def failed(self) -> bool:
        return self.kind in ("error", "malformed")

    @property
    def served(self) -> bool:
        return self.kind in ("right", "near_tie")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["start"], d["end"] = round(self.start, 3), round(self.end, 3)
        return d


def openai_error(obj: Any) -> str | None:
    """``error.code`` if ``obj`` is ``{"error": {message, type, param, code}}`` (code a string), else None."""
    if isinstance(obj, dict) and set(obj) == {"error"} and isinstance(obj["error"], dict):
        e = obj["error"]
        if set(e) == ERROR_KEYS and isinstance(e["code"], str) and isinstance(e["message"], str):
            return e["code"]
    return None


def _judge(out: Outcome, refs: References, key: str, text: str) -> None:
    verdict = refs.check(out.model, key, text)
    out.kind = "right" if verdict.ok else "near_tie" if verdict.near_tie else "wrong"
    if out.kind == "wrong":
        out.detail = f"as {verdict.as_model}: {text[:80]!r}"


def _error_response(out: Outcome, r: httpx.Response, body: bytes) -> None:
    out.retry_after = r.headers.get("retry-after")
    try:
        code = openai_error(json.loads(body))
    except ValueError:
        code = None
    out.kind, out.code = ("error", code) if code is not None else ("malformed", None)
    if code is None:
        out.detail = body[:200].decode(errors="replace")


async def _plain(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], out: Outcome, refs: References
) -> None:
    r = await http.post(url + PATH, json=body)
    out.status = r.status_code
    if r.status_code != 200:
        return _error_response(out, r, r.content)
    out.started = True
    try:
        text = r.json()["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        out.detail = r.text[:200]
        return
    _judge(out, refs, request_key(body), text)


async def _stream(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], out: Outcome, refs: References
) -> None:
    async with http.stream("POST", url + PATH, json={**body, "stream": True}) as r:
        out.status = r.status_code
        if r.status_code != 200:
            return _error_response(out, r, await r.aread())
        out.started = True
        events: list[str] = []
        text: list[str] = []
        try:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        except httpx.HTTPError as exc:
            out.detail = f"stream cut: {type(exc).__name__} after {len(events)} events"
            return
    errors = []
    for data in events:
        if data == "[DONE]":
            continue
        obj = json.loads(data)
        if "error" in obj:
            errors.append(obj)
        else:
            text += [c["delta"].get("content") or "" for c in obj.get("choices", [])[:1]]
    done = events.count("[DONE]")
    if not errors and done == 1 and events[-1] == "[DONE]":
        return _judge(out, refs, request_key(body), "".join(text))
    code = openai_error(errors[0]) if len(errors) == 1 and done == 0 and events[-1] != "[DONE]" else None
    if code is not None and json.loads(events[-1]) == errors[0]:
        out.kind, out.code = "error", code
    else:
        out.detail = f"stream ended with {len(errors)} error events, {done} [DONE]: {events[-1:]}"


async def one_request(
    http: httpx.AsyncClient, url: str, model: str, body: dict[str, Any], stream: bool, refs: References,
    client: int, t0: float,
) -> Outcome:  # fmt: skip
    """Send one request, judge it (never raises for the server's behaviour)."""
    out = Outcome(client, model, stream, time.monotonic() - t0)
    try:
        await (_stream if stream else _plain)(http, url, body, out, refs)
    except httpx.HTTPError as exc:  # no status, or the body never came whole
        out.kind, out.detail = "malformed", f"{type(exc).__name__}: {exc}"[:200]
    except ValueError as exc:  # an SSE event that is not JSON
        out.kind, out.detail = "malformed", f"bad event: {exc}"[:200]
    out.end = time.monotonic() - t0
    return out


async def run_clients(
    url: str,
    plan: Plan,
    refs: References,
    *,
    clients: int = 24,
    stop: Callable[[], bool],
    t0: float | None = None,
    seed: int = 0,
    backoff_s: float = 1.0,
    timeout_s: float = 120.0,
    outcomes: list[Outcome] | None = None,
) -> list[Outcome]:
    """``clients`` closed-loop clients until ``stop()``; each draws a (model, body) of ``plan`` and streams
    or not at random (its own seeded generator). Outcomes are appended to ``outcomes`` as they end."""
    t0 = time.monotonic() if t0 is None else t0
    out: list[Outcome] = [] if outcomes is None else outcomes
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + i)
        while not stop():
            model, body = plan[rng.randrange(len(plan))]
            o = await one_request(http, url, model, body, rng.random() < 0.5, refs, i, t0)
            out.append(o)
            if o.failed:
                pause = backoff_s
                with contextlib.suppress(TypeError, ValueError):
                    pause = min(float(o.retry_after), backoff_s)  # type: ignore[arg-type]
                await asyncio.sleep(pause)

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return out


def _clients_process(url: str, plan: Plan, refs: References, clients: int, t0: float, stop: Any, ready: Any,
                     results: Any) -> None:  # fmt: skip
    outcomes: list[Outcome] = []

    def stopped() -> bool:
        if outcomes and not ready.is_set():
            ready.set()
        return bool(stop.is_set())

    try:
        asyncio.run(run_clients(url, plan, refs, clients=clients, stop=stopped, t0=t0, outcomes=outcomes))
        results.put(outcomes)
    except BaseException as exc:  # noqa: BLE001 - raised again in the parent's stop()
        results.put(f"{type(exc).__name__}: {exc}")


class BackgroundClients:
    """``run_clients`` in a process of its own, for tests that drive a kill from their own thread: in the
    test's process the clients would hold its GIL, and the test's own reads and its kill would come late.
    Times share ``t0`` (``time.monotonic`` is one clock for every process); ``outcomes`` come back at
    ``stop()``."""

    def __init__(self, url: str, plan: Plan, refs: References, clients: int = 24) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.outcomes: list[Outcome] = []
        self.t0 = time.monotonic()
        self._stop, self._ready, self._results = ctx.Event(), ctx.Event(), ctx.Queue()
        self._started = False
        args = (url, list(plan), refs, clients, self.t0, self._stop, self._ready, self._results)
        self._proc = ctx.Process(target=_clients_process, args=args, name="chaos-clients", daemon=True)

    def start(self, timeout: float = 120) -> None:
        """Start the clients; return once the first request has ended."""
        self._proc.start()
        self._started = True
        assert self._ready.wait(timeout), "the chaos clients never finished a request"

    def now(self) -> float:
        return time.monotonic() - self.t0

    def stop(self, timeout: float = 180) -> list[Outcome]:
        if self._stop.is_set() or not self._started:
            return self.outcomes
        self._stop.set()
        result = self._results.get(timeout=timeout)
        self._proc.join(30)
        if isinstance(result, str):
            raise RuntimeError(f"chaos clients failed: {result}")
        self.outcomes = result
        return self.outcomes


@contextlib.contextmanager
def background_clients(
    url: str, plan: Plan, refs: References, clients: int = 24
) -> Iterator[BackgroundClients]:
    """Clients running (in a process of their own) for the block; their outcomes are there after it."""
    bg = BackgroundClients(url, plan, refs, clients)
    bg.start()
    try:
        yield bg
    finally:
        bg.stop()


def summarize(outcomes: Sequence[Outcome], kill_at: float | None = None) -> dict[str, Any]:
    """The figures of one chaos run (see the module docstring for the kinds)."""
    kinds = Counter(o.kind for o in outcomes)
    failures = Counter(
        f"{'stream' if o.stream and o.started else o.status or 'no status'} {o.code or o.kind}"
        for o in outcomes
        if o.failed
    )
    streams = [o for o in outcomes if o.stream and o.started]
    s503 = [o for o in outcomes if o.status == 503]
    after = [o for o in outcomes if kill_at is not None and o.served and o.start >= kill_at]
    served_again = min((o.end for o in after), default=None)
    return {
        "requests_sent": len(outcomes),
        "streamed": sum(o.stream for o in outcomes),
        "right": kinds["right"],
        "near_ties": kinds["near_tie"],
        "wrong": kinds["wrong"],
        "failed": kinds["error"] + kinds["malformed"],
        "failed_openai_shaped": kinds["error"],
        "failed_not_openai_shaped": kinds["malformed"],
        "failures_by_kind": dict(failures.most_common()),
        "unstarted_lost": sum(1 for o in outcomes if o.failed and not o.started),
        "started_lost": sum(1 for o in outcomes if o.failed and o.started),
        "streams_started": len(streams),
        "streams_done": sum(o.served or o.kind == "wrong" for o in streams),
        "streams_one_error": sum(o.kind == "error" for o in streams),
        "streams_bad_end": sum(o.kind == "malformed" for o in streams),
        "responses_503": len(s503),
        "responses_503_with_retry_after": sum(_positive(o.retry_after) for o in s503),
        "seconds_until_served_again": (
            None if served_again is None or kill_at is None else round(served_again - kill_at, 2)
        ),
        "examples": {
            "wrong": [o.to_dict() for o in outcomes if o.kind == "wrong"][:5],
            "malformed": [o.to_dict() for o in outcomes if o.kind == "malformed"][:5],
        },
    }


def _positive(value: str | None) -> bool:
    try:
        return value is not None and int(value) > 0
    except ValueError:
        return False


def violations(s: dict[str, Any], *, unstarted_lost: int | None = None) -> list[str]:
    """What breaks the promise: any wrong answer, non-OpenAI failure, bad stream end, bare 503; and, where
    given, more unstarted requests lost than ``unstarted_lost``."""
    out = []
    if s["wrong"]:
        out.append(f"{s['wrong']} wrong answers: {s['examples']['wrong']}")
    if s["failed_not_openai_shaped"] or s["streams_bad_end"]:
        out.append(
            f"{s['failed_not_openai_shaped']} failures not OpenAI-shaped: {s['examples']['malformed']}"
        )
    if s["responses_503_with_retry_after"] != s["responses_503"]:
        out.append(f"{s['responses_503'] - s['responses_503_with_retry_after']} 503s without Retry-After")
    if unstarted_lost is not None and s["unstarted_lost"] > unstarted_lost:
        out.append(f"{s['unstarted_lost']} unstarted requests lost: {s['failures_by_kind']}")
    return out
