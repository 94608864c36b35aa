"""The comparison's pure arithmetic and files, from a synthetic payload (no servers): ratios per
concurrency, memory totals, target verdicts, the markdown and the two plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loadtest.compare.report import summarize_compare, write_compare_report
from loadtest.compare.run import CompareConfig, Measured, pooled_entry
from loadtest.harness import stats
from loadtest.harness.machine import machine_info
from loadtest.harness.records import RequestResult
from loadtest.harness.scenario import max_lora_rank


def level(c: int, e2e_s: float, ttft_s: float, *, loads: int | None = None) -> dict[str, Any]:
    recs = [
        RequestResult(
            index=i, model="m", ok=True, start=i * e2e_s / c, ttft=ttft_s, e2e=e2e_s, completion_tokens=8
        )
        for i in range(8)
    ]
    entry: dict[str, Any] = {"level": c, "summary": stats.summarize(recs), "per_model": {}}
    if loads is not None:
        entry.update(adapter_loads=loads, adapter_evictions=loads, adapter_load_errors=0)
        entry["loads_per_1000_requests"] = loads / 8 * 1000
    return entry


def payload() -> dict[str, Any]:
    modes = {
        "merged": [level(1, 0.10, 0.01), level(4, 0.10, 0.02)],
        "adapter_1": [level(1, 0.20, 0.02, loads=0), level(4, 0.20, 0.04, loads=0)],
        "adapter_n": [level(1, 0.25, 0.02, loads=0), level(4, 0.25, 0.04, loads=0)],
        "thrash": [level(1, 0.25, 0.05, loads=4), level(4, 0.30, 0.20, loads=2)],
    }
    cfg = {"adapters": ["/a/x", "/a/y"], "concurrency": [1, 4], "base": "/m/tiny", "base_name": None}
    cfg.update(mix="zipf:1.1", thrash_resident=1, max_loras=None, requests=8, prompt_tokens=8, max_tokens=8)
    cfg["ignore_eos"] = True
    memory = {
        "processes": {
            "merged": {"rss_bytes": 3 * 2**30, "pss_bytes": 2 * 2**30, "gpu_bytes": None},
            "lora": {"rss_bytes": 4 * 2**30, "pss_bytes": 3 * 2**30, "gpu_bytes": None},
        },
        "files": {"base_bytes": 100, "merged_bytes": 100, "adapter_bytes": {"x": 10, "y": 10}},
    }
    p = {"config": cfg, "modes": modes, "memory": memory, "machine": machine_info()}
    p.update(started_at="t0", finished_at="t1")
    return p


def test_ratios_memory_and_targets() -> None:
    s = summarize_compare(payload())
    one, four = s["per_concurrency"]
    assert one["ratios"]["throughput_adapter_1_vs_merged"] == pytest.approx(0.5)
    assert one["ratios"]["throughput_adapter_n_vs_adapter_1"] == pytest.approx(0.8)
    assert one["ratios"]["ttft_p99_adapter_1_vs_merged"] == pytest.approx(2.0)
    assert four["ratios"]["ttft_p99_thrash_vs_all_resident"] == pytest.approx(5.0)
    t = s["targets"]
    assert t["adapter_n_vs_adapter_1_throughput_min"] == pytest.approx(0.8)
    assert t["thrash_ttft_p99_ratio_max"] == pytest.approx(5.0)
    assert t["thrash_loads_per_1000_requests"] == pytest.approx(6 / 16 * 1000)
    m = s["memory"]
    assert m["rss_bytes"]["n_merged"] == 6 * 2**30 and m["rss_bytes"]["ratio"] == pytest.approx(1.5)
    assert m["file_bytes"] == {
        "one_merged": 100, "n_merged": 200, "base_plus_n_adapters": 120, "adapters": 20,
        "ratio": pytest.approx(200 / 120),
    }  # fmt: skip


def test_report_files(tmp_path: Path) -> None:
    p = payload()
    p["summary"] = summarize_compare(p)
    files = write_compare_report(tmp_path, p)
    text = files["report"].read_text()
    assert "missed by 0.10" in text  # 0.8x of one adapter's throughput against 0.9
    assert "missed by 2.00" in text  # thrash TTFT p99 5x against 3x
    for name in ("compare_throughput.png", "compare_ttft_p99.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_config_checks(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    (a / "adapter_config.json").write_text('{"r": 12}')
    assert max_lora_rank([a]) == 16
    with pytest.raises(ValueError, match="thrash"):
        CompareConfig(base=tmp_path, adapters=[a], out=tmp_path, thrash=True)
    with pytest.raises(ValueError, match="differ"):
        CompareConfig(base=tmp_path, adapters=[a, a], out=tmp_path)
    with pytest.raises(ValueError, match="mix"):
        CompareConfig(base=tmp_path, adapters=[a], out=tmp_path, mix="pareto")
    with pytest.raises(ValueError, match="thrash"):
        CompareConfig(base=tmp_path, adapters=[a], out=tmp_path, engine_thrash=True)
    with pytest.raises(ValueError, match="repeat"):
        CompareConfig(base=tmp_path, adapters=[a], out=tmp_path, repeat=0)


def run(ttfts: list[float], loads: int) -> Measured:
    recs = [
        RequestResult(
            index=i, model=f"m{i % 2}", ok=True, start=i * 0.1, ttft=t, e2e=t + 0.1, completion_tokens=4
        )
        for i, t in enumerate(ttfts)
    ]
    counters = {"adapter_loads": loads, "adapter_load_errors": 0, "adapter_evictions": loads}
    n = len(ttfts)
    summary = stats.summarize(recs, duration_s=1.0, requested=n)
    return Measured(recs, summary, duration_s=1.0, requested=n, hit_time_limit=False, counters=counters)


def test_repeats_pool_their_requests_and_keep_each_p99() -> None:
    quiet, noisy = run([0.1] * 99 + [0.2], loads=3), run([0.1] * 98 + [5.0, 6.0], loads=5)
    entry = pooled_entry(16, [quiet, noisy])
    s = entry["summary"]
    assert s["requests"]["completed"] == s["requests"]["requested"] == 200
    assert s["duration_s"] == 2.0 and s["request_throughput"] == pytest.approx(100.0)
    assert s["ttft_ms"]["count"] == 200 and s["ttft_ms"]["max"] == pytest.approx(6000)
    assert 100 < s["ttft_ms"]["p99"] < 6000, "a p99 over both runs' 200 requests"
    assert entry["adapter_loads"] == 8 and entry["loads_per_1000_requests"] == pytest.approx(40.0)
    assert [r["adapter_loads"] for r in entry["repeats"]] == [3, 5]
    assert entry["repeats"][0]["ttft_p99_ms"] < 250 < 4000 < entry["repeats"][1]["ttft_p99_ms"]
    assert sum(m["requests"]["completed"] for m in entry["per_model"].values()) == 200
    assert "repeats" not in pooled_entry(16, [quiet]), "one run: nothing to spread"


def test_engine_slots_thrash_and_the_spread_in_the_report(tmp_path: Path) -> None:
    p = payload()
    p["config"].update(repeat=2, engine_thrash=True)
    p["modes"]["engine_thrash"] = [level(1, 0.25, 0.03), level(4, 0.25, 0.06)]
    for lv in (lv for levels in p["modes"].values() for lv in levels):
        lv["repeats"] = [{"ttft_p99_ms": 10.0}, {"ttft_p99_ms": 30.0}]
    p["summary"] = summarize_compare(p)
    rows = p["summary"]["per_concurrency"]
    assert rows[1]["ratios"]["ttft_p99_engine_thrash_vs_all_resident"] == pytest.approx(1.5)
    assert p["summary"]["targets"]["engine_thrash_ttft_p99_ratio_max"] == pytest.approx(1.5)
    text = write_compare_report(tmp_path, p)["report"].read_text()
    assert (
        "kept by vLLM (--max-loras, --max-cpu-loras) <= 3x the all-resident p99 (worst concurrency) "
        "| 1.50x | met" in text
    )
    assert "## Spread over repeats" in text and "| 4 | adapter-only, N, engine slots | 10 / 30 |" in text
    assert "each level measured 2 times (numbers pool all 16)" in text


def test_the_answers_table_counts_near_ties_apart_from_wrong_answers(tmp_path: Path) -> None:
    """A near tie (the reference's two best tokens within 0.1 nats) is not a wrong answer: the report's
    total counts the wrong ones (it once summed the near ties under that name)."""
    p = payload()
    for mode, levels in p["modes"].items():
        for lvl in levels:
            wrong = 1 if mode == "merged" else 0
            lvl["verify"] = {"checked": 8, "wrong": wrong, "wrong_model": 0, "near_ties": 3}
    p["summary"] = summarize_compare(p)
    text = write_compare_report(tmp_path, p)["report"].read_text()
    assert "| concurrency | mode | checked | near ties | wrong | another model's |" in text
    assert "| 1 | merged | 8 | 3 | 1 | 0 |" in text
    assert "**2 wrong answers** of 64 checked (24 near ties" in text


def test_the_lora_vllm_compiles_unless_the_comparison_asks_for_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """`loadtest compare --no-lora-compile` measures vLLM's eager LoRA: the engine plugin's switch reaches
    vLLM's environment (and the gateway's own LORA_GATEWAY_* settings do not)."""
    from loadtest.servers.processes import LoraOptions, vllm_process_env

    monkeypatch.setenv("LORA_GATEWAY_LORA_COMPILE", "1")
    assert vllm_process_env(LoraOptions())["LORA_GATEWAY_LORA_COMPILE"] == "1"
    assert vllm_process_env(LoraOptions(compile=False))["LORA_GATEWAY_LORA_COMPILE"] == "0"
    assert vllm_process_env(None)["LORA_GATEWAY_LORA_OPS"] == "grouped"
    assert CompareConfig(base="b", adapters=["a"], out=Path("o")).to_dict()["lora_compile"] is True
