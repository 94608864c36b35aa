"""Smoke tests of ``loadtest run`` and ``loadtest compare`` (with both thrash scenarios, each level
measured twice) against the real vLLM on the CPU, at tiny sizes: the report's numbers are present and
consistent (counts add up, percentiles ordered, ratios are the quotients of the numbers they come
from, repeats pool into their level) and the plots exist.

``run`` drives the session's gateway; ``compare`` starts its own three vLLM servers (merged, the base
with --enable-lora, and the base with fewer LoRA slots, started together) and their gateways, once for
the whole module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loadtest.cli import app

pytestmark = pytest.mark.engine

PNG = b"\x89PNG\r\n\x1a\n"
N_ADAPTERS = 4
LEVELS = [1, 2]
REQUESTS = 6
REPEAT = 2
MAX_TOKENS = 4


def ordered(d: dict[str, Any]) -> bool:
    return d["count"] > 0 and d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"]


def check_level(entry: dict[str, Any], n: int) -> None:
    s, r = entry["summary"], entry["summary"]["requests"]
    assert r["requested"] == n and r["completed"] + r["failed"] + r["not_sent"] == n
    assert r["completed"] == n, s["errors"]
    assert sum(s["errors"].values()) == r["failed"]
    assert sum(m["requests"]["completed"] for m in entry["per_model"].values()) == r["completed"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert ordered(s[key]), key
    assert s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
    assert s["usage_reported"] == n and s["total_output_tokens"] == MAX_TOKENS * n  # ignore_eos
    assert s["request_throughput"] > 0 and s["output_token_throughput"] > 0


def check_answers(entry: dict[str, Any], n: int) -> None:
    """`--verify`: every answer checked, none wrong (base-model and adapter requests share batches here)."""
    v = entry["verify"]
    assert v["checked"] == n and sum(m["checked"] for m in v["per_model"].values()) == n
    assert v["wrong"] == 0, v["examples"]


def test_run_against_the_real_vllm(gateway_url: str, tmp_path: Path) -> None:
    args = ["run", "--target", gateway_url, "--models", "tiny-llama,demo-a", "--mix", "zipf:1.2"]
    args += ["--concurrency", "1,2", "--requests", str(REQUESTS), "--prompt-tokens", "8"]
    args += [
        "--max-tokens",
        str(MAX_TOKENS),
        "--stream",
        "--ignore-eos",
        "--token-ids",
        "--verify",
        "--out",
        str(tmp_path),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    payload = json.loads((tmp_path / "results.json").read_text())
    assert [lv["level"] for lv in payload["levels"]] == LEVELS
    for lv in payload["levels"]:
        check_level(lv, REQUESTS)
        check_answers(lv, REQUESTS)
    assert payload["verify"]["references_learned"] == REQUESTS  # the same requests at every level
    assert "## Answers checked" in (tmp_path / "report.md").read_text()
    for name in ("latency_vs_concurrency.png", "throughput_vs_concurrency.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    records = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert len(records) == len(LEVELS) * REQUESTS
    # ITL is one gap per pair of successive content chunks. vLLM sends a chunk per token unless its
    # engine runs ahead of the API server (a loaded machine), then one chunk carries several tokens.
    gaps = sum(len(r["chunk_times"]) - 1 for r in records)
    assert sum(lv["summary"]["itl_ms"]["count"] for lv in payload["levels"]) == gaps
    assert len(records) <= gaps <= (MAX_TOKENS - 1) * len(records)


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, tiny_cache: dict[str, Path]) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compare")
    args = ["compare", "--base", "tiny", "--random-adapters", str(N_ADAPTERS), "--thrash", "--engine-thrash"]
    args += ["--repeat", str(REPEAT)]
    args += ["--concurrency", ",".join(map(str, LEVELS)), "--requests", str(REQUESTS)]
    args += ["--prompt-tokens", "8", "--max-tokens", str(MAX_TOKENS)]
    args += ["--out", str(out / "report"), "--workdir", str(out / "work"), "--verify"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    return out / "report", json.loads((out / "report" / "results.json").read_text())


def test_compare_report_is_complete_and_consistent(compared: tuple[Path, dict]) -> None:
    out, payload = compared
    assert set(payload["modes"]) == {"merged", "adapter_1", "adapter_n", "thrash", "engine_thrash"}
    n_models = {"merged": 1, "adapter_1": 1, "adapter_n": N_ADAPTERS}
    for mode, levels in payload["modes"].items():
        assert [lv["level"] for lv in levels] == LEVELS, mode
        for lv in levels:
            check_level(lv, REQUESTS * REPEAT)
            check_answers(lv, REQUESTS * REPEAT)
            assert len(lv["per_model"]) <= n_models.get(mode, N_ADAPTERS)
            assert [r["completed"] for r in lv["repeats"]] == [REQUESTS] * REPEAT
            if "adapter_loads" in lv:
                assert sum(r["adapter_loads"] for r in lv["repeats"]) == lv["adapter_loads"]
    rows = payload["summary"]["per_concurrency"]
    assert [r["concurrency"] for r in rows] == LEVELS
    for row in rows:
        m, a1, an = (row["modes"][k] for k in ("merged", "adapter_1", "adapter_n"))
        rt = row["ratios"]
        assert rt["throughput_adapter_1_vs_merged"] == pytest.approx(
            a1["output_token_throughput"] / m["output_token_throughput"]
        )
        assert rt["throughput_adapter_n_vs_adapter_1"] == pytest.approx(
            an["output_token_throughput"] / a1["output_token_throughput"]
        )
        assert rt["ttft_p99_adapter_1_vs_merged"] == pytest.approx(a1["ttft_p99_ms"] / m["ttft_p99_ms"])
        assert rt["tpot_p50_adapter_1_vs_merged"] == pytest.approx(a1["tpot_p50_ms"] / m["tpot_p50_ms"])
        assert a1["adapter_loads"] == 0 and an["adapter_evictions"] == 0  # all resident: nothing moves
    mem = payload["summary"]["memory"]
    assert mem["n"] == N_ADAPTERS
    for key in ("rss_bytes", "pss_bytes"):
        assert mem[key]["one_merged"] > 2**20 and mem[key]["base_plus_n_adapters"] > 2**20
        assert mem[key]["n_merged"] == N_ADAPTERS * mem[key]["one_merged"]
    files = mem["file_bytes"]
    assert (
        files["n_merged"]
        == N_ADAPTERS * files["one_merged"]
        > files["base_plus_n_adapters"]
        > files["adapters"]
    )
    report = (out / "report.md").read_text()
    assert "## Memory" in report and "## Targets" in report and "adapter-only, 1 adapter" in report
    assert "## Answers checked" in report
    for name in ("compare_throughput.png", "compare_ttft_p99.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_thrash_loads_and_evicts(compared: tuple[Path, dict]) -> None:
    _, payload = compared
    assert payload["config"]["thrash_resident"] == N_ADAPTERS // 2
    thrash = payload["modes"]["thrash"]
    loads = sum(lv["adapter_loads"] for lv in thrash)
    evictions = sum(lv["adapter_evictions"] for lv in thrash)
    assert loads > 0 and evictions > 0 and all(lv["adapter_load_errors"] == 0 for lv in thrash)
    for lv in thrash:
        done = lv["summary"]["requests"]["completed"]
        assert lv["loads_per_1000_requests"] == pytest.approx(lv["adapter_loads"] / done * 1000)
    t = payload["summary"]["targets"]
    done = sum(lv["summary"]["requests"]["completed"] for lv in thrash)
    assert t["thrash_loads_per_1000_requests"] == pytest.approx(loads / done * 1000)
    ratios = [r["ratios"]["ttft_p99_thrash_vs_all_resident"] for r in payload["summary"]["per_concurrency"]]
    assert t["thrash_ttft_p99_ratio_max"] == pytest.approx(max(ratios))


def test_engine_slots_thrash_loads_nothing(compared: tuple[Path, dict]) -> None:
    out, payload = compared
    # all registered: vLLM swaps them through its slots and reads evicted ones back from disk itself
    for lv in payload["modes"]["engine_thrash"]:
        assert lv["adapter_loads"] == lv["adapter_evictions"] == lv["adapter_load_errors"] == 0
    rows = payload["summary"]["per_concurrency"]
    for row in rows:
        et, an = row["modes"]["engine_thrash"], row["modes"]["adapter_n"]
        assert row["ratios"]["ttft_p99_engine_thrash_vs_all_resident"] == pytest.approx(
            et["ttft_p99_ms"] / an["ttft_p99_ms"]
        )
    ratios = [r["ratios"]["ttft_p99_engine_thrash_vs_all_resident"] for r in rows]
    assert payload["summary"]["targets"]["engine_thrash_ttft_p99_ratio_max"] == pytest.approx(max(ratios))
    report = (out / "report.md").read_text()
    assert "## Spread over repeats" in report and "kept by vLLM (--max-loras, --max-cpu-loras)" in report
    slots = payload["config"]["thrash_resident"]
    assert f"(--max-loras and --max-cpu-loras {slots})" in report
