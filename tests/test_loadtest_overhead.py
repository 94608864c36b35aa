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


def test_relay_cpu_added_itl_and_the_level_within_the_budget() -> None:
    from loadtest.overhead.relay_cpu import add_itl_deltas, summarize

    def row(path: str, streams: int, p99: float, eps: int, cpu: float, rnd: int = 0) -> dict:
        return {"round": rnd, "path": path, "streams": streams, "itl_p99_ms": p99, "events_per_s": eps,
                "cpu_us_per_event": cpu}  # fmt: skip

    rows = [
        row("direct", 16, 10.2, 1600, 40.0),
        row("socket", 16, 10.6, 1590, 30.0),
        row("direct", 64, 10.5, 6300, 41.0),
        row("socket", 64, 11.9, 6100, 27.0),  # 1.4 ms added: over the budget
    ]
    add_itl_deltas(rows)
    assert [r.get("added_itl_p99_ms") for r in rows] == [None, 0.4, None, 1.4]
    s = summarize(rows)
    assert s["within_itl_budget"]["socket"]["streams"] == 16
    assert s["within_itl_budget"]["socket"]["events_per_s"] == 1590
    assert s["levels"]["socket"][64]["cpu_us_per_event"] == 27.0
