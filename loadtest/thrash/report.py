"""The thrash scenarios in compare's report: each one against the all-resident mode (adapter-N) of the
same level, the worst TTFT p99 ratio against its target, the gateway's loads per 1000 requests, and
their lines in ``report.md``. ``loadtest.compare.report`` puts these beside its own numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from loadtest.harness.report import fmt, times, verdict, worst_ratio

LABELS = {"thrash": "adapter-only, N, thrash", "engine_thrash": "adapter-only, N, engine slots"}
TARGET = 3.0  # TTFT p99 over more adapters than slots, at most this many times the all-resident one
SLOTS = {  # who keeps the slots, in the targets' order
    "engine_thrash": "kept by vLLM (--max-loras, --max-cpu-loras)",
    "thrash": "loaded by the gateway (registry.max_resident)",
}

Ratio = Callable[[dict[str, Any] | None, dict[str, Any] | None, str], float | None]


def thrash_ratios(points: dict[str, dict[str, Any]], r: Ratio) -> dict[str, float | None]:
    """One level's ratios of each thrash mode to the all-resident one (``r(a, b, key)``: a / b)."""
    all_resident = points.get("adapter_n")
    out = {}
    for mode in LABELS:
        out[f"ttft_p99_{mode}_vs_all_resident"] = r(points.get(mode), all_resident, "ttft_p99_ms")
        out[f"throughput_{mode}_vs_all_resident"] = r(
            points.get(mode), all_resident, "output_token_throughput"
        )
    return out


def thrash_targets(modes: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The measured modes' worst TTFT p99 ratio (over the levels) with the target, and the thrash
    gateway's adapter loads per 1000 completed requests."""
    out: dict[str, Any] = {}
    for mode in LABELS:
        if mode in modes:
            out[f"{mode}_ttft_p99_ratio_max"] = worst_ratio(rows, f"ttft_p99_{mode}_vs_all_resident", max)
            out["thrash_target"] = TARGET
    if "thrash" in modes:
        levels = modes["thrash"]
        done = sum(e["summary"]["requests"]["completed"] for e in levels)
        loads = sum(e.get("adapter_loads", 0) for e in levels)
        out["thrash_loads_per_1000_requests"] = loads / done * 1000 if done else None
    return out


def modes_text(cfg: dict[str, Any], present: Sequence[str]) -> str:
    """What the thrash modes were, for the report's list of modes (empty when none ran)."""
    n, k = len(cfg["adapters"]), cfg["thrash_resident"]
    out = ""
    if "thrash" in present:
        out += f"; thrash = the same with registry.max_resident {k} (the gateway loads and evicts adapters)"
    if "engine_thrash" in present:
        out += (
            f"; engine slots = another vLLM keeping {k} adapters (--max-loras and --max-cpu-loras {k}) "
            f"behind a gateway that registers all {n} (vLLM swaps adapters through its batch slots and "
            "reads evicted ones back from disk)"
        )
    return out


def target_rows(targets: dict[str, Any], cfg: dict[str, Any]) -> list[list[Any]]:
    """The targets table's thrash rows: target, measured, verdict."""
    n, rows = len(cfg["adapters"]), []
    for mode, what in SLOTS.items():
        if f"{mode}_ttft_p99_ratio_max" in targets:
            worst = targets[f"{mode}_ttft_p99_ratio_max"]
            rows.append(
                [
                    f"TTFT p99 with {n} adapters over {cfg['thrash_resident']} {what} <= "
                    f"{TARGET:g}x the all-resident p99 (worst concurrency)",
                    times(worst),
                    verdict(worst, TARGET, at_least=False),
                ]
            )
    if "thrash_ttft_p99_ratio_max" in targets:
        loads = fmt(targets["thrash_loads_per_1000_requests"], 1)
        rows.append(["thrash: adapter loads per 1000 requests", loads, "-"])
    return rows
