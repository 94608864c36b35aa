"""The overhead benchmark's pure logic: interleaving, added latency, the sustained verdict."""

from __future__ import annotations

from typing import Any

from loadtest.harness import stats
from loadtest.harness.records import RequestResult
from loadtest.harness.senders import jobs_for
from loadtest.harness.workload import WorkloadSpec, generate
from loadtest.overhead.run import added_latency, interleave, judge, max_sustained


def side(e2e_ms: list[float], *, failed: int = 0, requested: int | None = None) -> dict[str, Any]:
    recs = [RequestResult(index=i, model="m", ok=True, e2e=v / 1000) for i, v in enumerate(e2e_ms)]
    recs += [RequestResult(index=0, model="m", error_kind="502", e2e=0.001) for _ in range(failed)]
    return stats.summarize(recs, duration_s=1.0, requested=requested)


def test_interleave_pairs_the_same_request_in_alternating_order() -> None:
    specs = generate(WorkloadSpec(models=["m"]), 4)
    jobs = interleave(jobs_for("http://d", specs, "direct"), jobs_for("http://g", specs, "gateway"))
    assert [j.tag for j in jobs] == ["direct", "gateway", "gateway", "direct"] * 2
    assert [j.spec.index for j in jobs] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert jobs[0].url == "http://d/v1/chat/completions"


def test_added_latency_is_gateway_minus_direct() -> None:
    added = added_latency(side([1.0, 2.0, 3.0]), side([1.5, 2.5, 3.5]))
    assert added["e2e_ms"]["p50"] == 0.5 and added["e2e_ms"]["mean"] == 0.5
    assert added["ttfb_ms"]["p50"] is None  # not streamed: no TTFB on either side


def test_judge_and_max_sustained() -> None:
    assert judge(side([1.0] * 100), 50, 0.001) == (True, "ok")
    assert not judge(side([1.0] * 99 + [80.0] * 2), 50, 0.001)[0]
    ok, why = judge(side([1.0] * 100, failed=1), 50, 0.001)
    assert not ok and "failed" in why
    ok, why = judge(side([1.0] * 10, requested=20), 50, 0.001)
    assert not ok and "not sent" in why
    levels = [
        {"rate": 500, "mode": "nonstream", "sustained": False},
        {"rate": 50, "mode": "nonstream", "sustained": True},
        {"rate": 200, "mode": "nonstream", "sustained": True},
        {"rate": 1000, "mode": "nonstream", "sustained": True},  # after a miss: does not count
        {"rate": 50, "mode": "stream", "sustained": False},
    ]
    assert max_sustained(levels, "nonstream") == 200
    assert max_sustained(levels, "stream") is None
