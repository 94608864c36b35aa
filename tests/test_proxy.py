"""SSE rewriting: whole events only, exact `model` replacement, the gateway's own usage event hidden."""

from __future__ import annotations

import json

from gateway.proxy import SseRewriter, body_usage


def event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


STREAM = (
    event({"id": "1", "model": "lora-abc", "choices": [{"delta": {"content": "hi"}}]})
    + event({"id": "1", "model": "lora-abc", "choices": [{"delta": {"content": " there"}}]})
    + event(
        {"id": "1", "model": "lora-abc", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    )
    + b"data: [DONE]\n\n"
)


def run(rewriter: SseRewriter, cuts: list[int], stream: bytes = STREAM) -> bytes:
    """`stream` fed to `rewriter` in pieces cut at `cuts`, and what it gave back."""
    out, last = b"", 0
    for cut in [*cuts, len(stream)]:
        out += rewriter.feed(stream[last:cut])
        last = cut
    return out + rewriter.flush()


def test_model_rewritten_across_any_chunk_boundary() -> None:
    expected = STREAM.replace(b'"model":"lora-abc"', b'"model":"sql"')
    for cut in range(1, len(STREAM)):
        r = SseRewriter("lora-abc", "sql")
        assert run(r, [cut]) == expected
        assert r.usage == {"prompt_tokens": 3, "completion_tokens": 2}


def test_usage_event_dropped_only_when_the_client_did_not_ask() -> None:
    hidden = run(SseRewriter("lora-abc", "sql", drop_usage=True), [7, 50, 51])
    assert b'"usage"' not in hidden and hidden.endswith(b"data: [DONE]\n\n") and hidden.count(b"data: ") == 3
    shown = run(SseRewriter("lora-abc", "sql"), [])
    assert b'"usage":{' in shown


def test_same_name_passes_bytes_through() -> None:
    assert run(SseRewriter("tiny-llama", "tiny-llama"), [10]) == STREAM


def test_body_usage_reads_only_the_usage_object() -> None:
    body = (
        b'{"id":"x","model":"lora-abc","choices":[{"text":"a \\"usage\\":{ trap"}],'
        b'"usage":{"prompt_tokens":4,"completion_tokens":7}}'
    )
    assert body_usage(body) == {"prompt_tokens": 4, "completion_tokens": 7}
    assert body_usage(b'{"id":"x"}') is None
    assert body_usage(b'{"usage":{broken') is None
