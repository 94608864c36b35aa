"""The comparison's pure arithmetic and files, from a synthetic payload (no servers): ratios per
concurrency, memory totals, target verdicts, the markdown and the two plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loadtest import stats
from loadtest.compare import CompareConfig, max_lora_rank
from loadtest.compare_report import summarize_compare, write_compare_report
from loadtest.machine import machine_info
from loadtest.records import RequestResult


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
