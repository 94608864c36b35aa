"""Pure metrics: percentiles, TPOT without the first token, ITL, error counting, per-model sums;
plus the pure parts of workload generation and response parsing (no network)."""

from __future__ import annotations

import json
import math

import pytest

from loadtest.harness import stats
from loadtest.harness.parse import StreamParser, read_body
from loadtest.harness.records import RequestResult
from loadtest.harness.workload import WorkloadSpec, generate, mix_weights, poisson_schedule


def ok(
    model: str = "m",
    *,
    start: float = 0.0,
    ttft: float | None = 0.1,
    e2e: float = 1.0,
    chunks: list[float] | None = None,
    tokens: int = 10,
) -> RequestResult:
    return RequestResult(
        index=0,
        model=model,
        ok=True,
        status=200,
        start=start,
        ttft=ttft,
        e2e=e2e,
        chunk_times=chunks or [],
        prompt_tokens=5,
        completion_tokens=tokens,
    )


def failed(kind: str, status: int | None = None, model: str = "m") -> RequestResult:
    return RequestResult(index=0, model=model, ok=False, status=status, error="x", error_kind=kind, e2e=0.01)


def test_percentile_matches_linear_interpolation() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert stats.percentile(xs, 0) == 1.0
    assert stats.percentile(xs, 100) == 4.0
    assert stats.percentile(xs, 50) == 2.5
    assert stats.percentile([3.0, 1.0, 2.0], 50) == 2.0  # sorts its input
    assert math.isnan(stats.percentile([], 50))
    with pytest.raises(ValueError):
        stats.percentile(xs, 101)


def test_distribution_is_ordered_and_scaled() -> None:
    d = stats.distribution([0.005 * i for i in range(1, 201)], scale=1000.0)
    assert d["count"] == 200
    assert d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"]
    assert d["p50"] == pytest.approx(502.5)
    assert d["mean"] == pytest.approx(502.5)
    empty = stats.distribution([])
    assert empty["count"] == 0 and empty["p50"] is None and empty["mean"] is None


def test_tpot_excludes_the_first_token() -> None:
    r = ok(ttft=0.2, e2e=1.2, tokens=11)
    assert stats.tpot(r) == pytest.approx(0.1)  # (1.2 - 0.2) / (11 - 1), not 1.2 / 11
    assert stats.tpot(ok(tokens=1)) is None
    assert stats.tpot(ok(ttft=None)) is None


def test_itl_is_the_gaps_between_content_chunks() -> None:
    r = ok(chunks=[0.1, 0.15, 0.35])
    assert stats.itls(r) == pytest.approx([0.05, 0.2])
    assert stats.itls(ok(chunks=[0.1])) == []


def test_errors_are_counted_by_kind_and_kept_out_of_latency() -> None:
    results = [
        ok(),
        ok(),
        failed("503", 503),
        failed("503", 503),
        failed("ReadTimeout"),
        failed("stream_error", 200),
    ]
    s = stats.summarize(results, duration_s=2.0, requested=8)
    assert s["errors"] == {"503": 2, "ReadTimeout": 1, "stream_error": 1}
    assert s["requests"] == {"requested": 8, "sent": 6, "completed": 2, "failed": 4, "not_sent": 2}
    assert s["e2e_ms"]["count"] == 2
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_token_throughput"] == pytest.approx(10.0)


def test_summary_throughput_and_per_model_sums() -> None:
    results = [
        ok("a", start=0.0, e2e=1.0),
        ok("a", start=0.5, e2e=1.5),
        ok("b", start=1.0, e2e=1.0),
        failed("429", 429, "b"),
    ]
    s = stats.summarize(results)
    assert s["duration_s"] == pytest.approx(2.0)  # first start 0.0 to last end 2.0
    assert s["request_throughput"] == pytest.approx(1.5)
    per = stats.per_model(results)
    assert set(per) == {"a", "b"}
    assert sum(p["requests"]["sent"] for p in per.values()) == s["requests"]["sent"]
    assert sum(p["requests"]["completed"] for p in per.values()) == s["requests"]["completed"]
    assert sum(p["request_throughput"] for p in per.values()) == pytest.approx(s["request_throughput"])
    assert per["b"]["errors"] == {"429": 1}


def test_send_lag_only_for_open_loop_records() -> None:
    r = ok(start=1.25)
    assert r.send_lag is None
    r.scheduled = 1.0
    assert r.send_lag == pytest.approx(0.25)
    assert stats.summarize([r])["send_lag_ms"]["p50"] == pytest.approx(250.0)


def test_mix_weights() -> None:
    assert mix_weights("uniform", 4) == [0.25] * 4
    w = mix_weights("zipf:1", 3)
    assert w == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    for bad in ("zipf", "zipf:0", "zipf:x", "pareto"):
        with pytest.raises(ValueError, match="mix"):
            mix_weights(bad, 3)


def test_workload_is_deterministic_and_follows_the_mix() -> None:
    spec = WorkloadSpec(models=["a", "b", "c", "d"], mix="zipf:1.5", prompt_tokens=20, max_tokens=7, seed=3)
    one, two = generate(spec, 400), generate(spec, 400)
    assert one == two
    counts = {m: sum(r.model == m for r in one) for m in "abcd"}
    assert counts["a"] > counts["b"] > counts["d"]
    body = json.loads(one[0].body)
    assert body["max_tokens"] == 7 and "stream" not in body
    assert len(body["messages"][0]["content"].split()) == 20
    assert generate(WorkloadSpec(models=["a"], seed=4), 5) != generate(WorkloadSpec(models=["a"], seed=5), 5)
    streamed = json.loads(
        generate(WorkloadSpec(models=["a"], stream=True, endpoint="completions"), 1)[0].body
    )
    assert streamed["stream_options"] == {"include_usage": True} and "prompt" in streamed


def test_poisson_schedule() -> None:
    times = poisson_schedule(100.0, 2000, seed=1)
    assert times[0] == 0.0 and times == sorted(times)
    assert 2000 / times[-1] == pytest.approx(100.0, rel=0.1)
    assert poisson_schedule(100.0, 10, seed=1) == times[:10]


def test_stream_parser_records_chunks_usage_and_errors() -> None:
    rec = RequestResult(index=0, model="m")
    p = StreamParser(rec, start=0.0)
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    tok = {"choices": [{"index": 0, "delta": {"content": "x"}}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}
    lines = [f"data: {json.dumps(e)}" for e in (role, tok, tok)] + [
        "",
        ": comment",
        f"data: {json.dumps(usage)}",
    ]
    assert not any(p.feed(line) for line in lines)
    assert p.feed(b"data: [DONE]")
    p.finish()
    assert rec.ok and rec.usage_reported and rec.completion_tokens == 5 and len(rec.chunk_times) == 2
    assert rec.ttfb is not None and rec.ttft is not None and rec.ttfb <= rec.ttft

    rec = RequestResult(index=0, model="m")
    p = StreamParser(rec, start=0.0)
    p.feed('data: {"choices": [{"text": "a"}]}')
    assert p.feed('data: {"error": {"message": "boom", "code": 500}}')
    p.finish()
    assert not rec.ok and rec.error_kind == "stream_error" and rec.error == "boom"

    rec = RequestResult(index=0, model="m")
    p = StreamParser(rec, start=0.0)
    p.feed('data: {"choices": [{"text": "a"}]}')
    p.finish()  # no [DONE]
    assert not rec.ok and rec.error_kind == "incomplete_stream"


def test_stream_parser_counts_token_id_chunks_without_text() -> None:
    """vLLM's return_token_ids: a chunk per token even while the text of a character is held back."""
    rec = RequestResult(index=0, model="m")
    p = StreamParser(rec, start=0.0)
    p.feed('data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}')
    p.feed('data: {"choices": [{"delta": {}, "token_ids": [300]}]}')
    p.feed('data: {"choices": [{"delta": {"content": "é"}, "token_ids": [301]}]}')
    p.feed("data: [DONE]")
    p.finish()
    assert rec.ok and len(rec.chunk_times) == 2 and rec.completion_tokens == 2
    assert rec.ttft == rec.chunk_times[0]


def test_read_body() -> None:
    rec = RequestResult(index=0, model="m")
    read_body(rec, 200, b'{"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 4}}')
    assert rec.ok and rec.completion_tokens == 4
    rec = RequestResult(index=0, model="m")
    read_body(rec, 404, b'{"error": {"message": "The model `x` does not exist.", "code": 404}}')
    assert not rec.ok and rec.error_kind == "404" and "does not exist" in (rec.error or "")
