"""`loadtest/overhead/tenancy_cpu.py` at a tiny size: its servers start (the fast upstream, a gateway per
configuration, a redis-server), a key is made on each keyed gateway, every answer is a 200, and the results
and plot are written. The figures in docs/benchmarks.md come from the full run."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.overhead.tenancy_cpu import run, summarize


def test_summarize_subtracts_the_baseline_of_the_same_round() -> None:
    rows = [
        {"round": 0, "config": "baseline", "cpu_us_per_request": 300.0},
        {"round": 0, "config": "key", "cpu_us_per_request": 310.0},
        {"round": 1, "config": "baseline", "cpu_us_per_request": 200.0},
        {"round": 1, "config": "key", "cpu_us_per_request": 230.0},
    ]
    s = summarize(rows)
    assert s["key"]["added_us_median"] == 20.0 and s["baseline"]["added_us_median"] == 0.0


def test_tiny_run(tmp_path: Path) -> None:
    payload = run(
        tmp_path, concurrency=2, duration_s=0.5, rounds=1, configs=["key+redis-limits"], log=lambda _: None
    )
    assert [r["config"] for r in payload["rows"]] == ["baseline", "key+redis-limits"]
    assert all(r["requests"] > 0 and r["failed"] == 0 for r in payload["rows"])
    assert json.loads((tmp_path / "results.json").read_text())["summary"].keys() == {
        "baseline",
        "key+redis-limits",
    }
    assert (tmp_path / "tenancy_cpu.png").stat().st_size > 0
