"""loadtest/chaos/clients.py: how each response is judged (no server: httpx's MockTransport)."""

from __future__ import annotations

import asyncio
import json

import httpx

from loadtest.chaos.clients import Outcome, chaos_plan, one_request, summarize, violations
from loadtest.harness.verify import References, request_key

[(MODEL, BODY)] = chaos_plan(["m"], prompts=["hi"])
ERROR = {"error": {"message": "down", "type": "server_error", "param": None, "code": "engine_unavailable"}}


def sse(*events: object) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def judged(response: httpx.Response, stream: bool) -> Outcome:
    refs = References()
    refs.add(MODEL, request_key(BODY), "hello")
    refs.add("other", request_key(BODY), "howdy")

    async def main() -> Outcome:
        transport = httpx.MockTransport(lambda _: response)
        async with httpx.AsyncClient(transport=transport) as http:
            return await one_request(http, "http://gw", MODEL, BODY, stream, refs, 0, 0.0)

    return asyncio.run(main())


def test_answers_are_judged_against_the_reference() -> None:
    ok = {"choices": [{"message": {"content": "hello"}}]}
    assert judged(httpx.Response(200, json=ok), False).kind == "right"
    other = {"choices": [{"message": {"content": "howdy"}}]}
    o = judged(httpx.Response(200, json=other), False)
    assert o.kind == "wrong" and "as other" in (o.detail or "")
    assert judged(httpx.Response(200, content=sse(chunk("hel"), chunk("lo"), "[DONE]")), True).kind == "right"


def test_failures_are_openai_shaped_or_malformed() -> None:
    o = judged(httpx.Response(503, json=ERROR, headers={"retry-after": "2"}), False)
    assert (o.kind, o.code, o.retry_after, o.started) == ("error", "engine_unavailable", "2", False)
    assert judged(httpx.Response(502, json={"error": "down"}), False).kind == "malformed"
    assert judged(httpx.Response(502, text="<html>"), True).kind == "malformed"
    s = judged(httpx.Response(200, content=sse(chunk("he"), ERROR)), True)
    assert (s.kind, s.started) == ("error", True)
    for body in (sse(chunk("he")), sse(chunk("he"), ERROR, "[DONE]"), sse(ERROR, ERROR)):
        assert judged(httpx.Response(200, content=body), True).kind == "malformed", body


def test_summary_counts_what_the_promise_is_about() -> None:
    out = [
        Outcome(0, "m", False, 0.0, 0.5, "right", 200, started=True),
        Outcome(1, "m", False, 1.0, 1.1, "error", 503, "engine_unavailable", None),
        Outcome(2, "m", True, 1.2, 1.5, "error", 200, "upstream_error", started=True),
        Outcome(3, "m", True, 3.0, 4.0, "right", 200, started=True),
    ]
    s = summarize(out, kill_at=1.0)
    assert (s["requests_sent"], s["right"], s["failed"], s["unstarted_lost"]) == (4, 2, 2, 1)
    assert s["seconds_until_served_again"] == 3.0 and s["streams_one_error"] == 1
    assert violations(s) == ["1 503s without Retry-After"]
    assert len(violations(s, unstarted_lost=0)) == 2
