"""Smoke test of ``loadtest routing`` against two real vLLM CPU replicas, at tiny sizes: the report's
numbers are present and consistent (counts add up, percentiles ordered, loads per 1000 requests and the
affinity / round-robin ratios are the quotients of the numbers they come from), the plots exist, and
affinity made no more adapter loads than round-robin on the same request sequence.

The command starts its own two replicas (together) and one gateway per policy and level.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loadtest.cli import app
from loadtest.routing.report import RATIO_KEYS

pytestmark = pytest.mark.engine

PNG = b"\x89PNG\r\n\x1a\n"
N_ADAPTERS = 4
RESIDENT = 2
LEVELS = [1, 2]
REQUESTS = 20
MAX_TOKENS = 4


def ordered(d: dict[str, Any]) -> bool:
    return d["count"] > 0 and d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"]


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory, tiny_cache: dict[str, Path]) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("routing")
    args = ["routing", "--replicas", "2", "--random-adapters", str(N_ADAPTERS), "--resident", str(RESIDENT)]
    args += ["--mix", "zipf:1.1", "--concurrency", ",".join(map(str, LEVELS)), "--requests", str(REQUESTS)]
    args += ["--prompt-tokens", "8", "--max-tokens", str(MAX_TOKENS)]
    args += ["--out", str(out / "report"), "--workdir", str(out / "work"), "--verify"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    return out / "report", json.loads((out / "report" / "results.json").read_text())


def test_routing_report_is_complete_and_consistent(routed: tuple[Path, dict]) -> None:
    out, payload = routed
    assert payload["kind"] == "routing" and set(payload["policies"]) == {"affinity", "round_robin"}
    cfg = payload["config"]
    assert (cfg["replicas"], cfg["resident"], len(cfg["adapters"])) == (2, RESIDENT, N_ADAPTERS)
    for policy, levels in payload["policies"].items():
        assert [lv["level"] for lv in levels] == LEVELS, policy
        for lv in levels:
            s, r = lv["summary"], lv["summary"]["requests"]
            assert r["requested"] == REQUESTS and r["completed"] + r["failed"] + r["not_sent"] == REQUESTS
            assert r["completed"] == REQUESTS, s["errors"]
            v = lv["verify"]  # --verify: every answer checked against its adapter's answer alone
            assert v["checked"] == REQUESTS and v["wrong"] == 0, v["examples"]
            assert sum(m["requests"]["completed"] for m in lv["per_model"].values()) == REQUESTS
            assert len(lv["per_model"]) <= N_ADAPTERS
            for key in ("ttft_ms", "e2e_ms"):
                assert ordered(s[key]), key
            assert s["total_output_tokens"] == MAX_TOKENS * REQUESTS  # ignore_eos
            assert lv["adapter_load_errors"] == 0
            assert lv["loads_per_1000_requests"] == pytest.approx(1000 * lv["adapter_loads"] / REQUESTS)
            assert lv["adapter_evictions"] <= lv["adapter_loads"]
            assert all(len(names) <= RESIDENT for names in lv["resident_after"].values())
    # the same request sequence under both policies: the same adapters, as often
    for a, rr in zip(payload["policies"]["affinity"], payload["policies"]["round_robin"], strict=True):
        counts = [{m: v["requests"]["requested"] for m, v in x["per_model"].items()} for x in (a, rr)]
        assert counts[0] == counts[1]
    rows = payload["summary"]["per_concurrency"]
    assert [r["concurrency"] for r in rows] == LEVELS
    for row in rows:
        a, rr = row["policies"]["affinity"], row["policies"]["round_robin"]
        for key in RATIO_KEYS:
            got = row["ratios"][f"{key}_affinity_vs_round_robin"]
            if rr[key]:
                assert got == pytest.approx(a[key] / rr[key]), key
            else:
                assert got is None, key
        for q in (a, rr):  # each request's e2e >= its TTFT, so the same holds for the quantiles
            assert q["ttft_p50_ms"] <= q["ttft_p99_ms"] <= q["e2e_p99_ms"]
            assert q["completed"] == REQUESTS and q["failed"] == 0
    t = payload["summary"]["totals"]
    for p in ("affinity", "round_robin"):
        loads = sum(lv["adapter_loads"] for lv in payload["policies"][p])
        assert t[p]["completed"] == REQUESTS * len(LEVELS) and t[p]["adapter_loads"] == loads
        assert t[p]["loads_per_1000_requests"] == pytest.approx(1000 * loads / (REQUESTS * len(LEVELS)))
    if t["round_robin"]["adapter_loads"]:
        assert t["loads_ratio_affinity_vs_round_robin"] == pytest.approx(
            t["affinity"]["adapter_loads"] / t["round_robin"]["adapter_loads"]
        )
    report = (out / "report.md").read_text()
    assert "## Affinity / round-robin" in report and "round-robin" in report and "CPU:" in report
    for name in ("routing_loads.png", "routing_ttft_p99.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_affinity_loads_no_more_than_round_robin(routed: tuple[Path, dict]) -> None:
    _, payload = routed
    t = payload["summary"]["totals"]
    assert t["round_robin"]["adapter_loads"] > 0  # 4 adapters over 2 slots per replica must move
    assert t["affinity"]["adapter_loads"] <= t["round_robin"]["adapter_loads"], t
