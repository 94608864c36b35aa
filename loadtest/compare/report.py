"""The comparison's numbers side by side: ratios per concurrency, loads, memory, two plots; the thrash
modes' ratios, targets and lines come from ``loadtest.thrash.report``.

Everything is derived from the ``compare`` payload alone (``summarize_compare``), so a report can be
re-rendered from ``results.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.harness.report import (
    concurrency_panel,
    fmt,
    machine_lines,
    pyplot,
    ratio,
    table,
    times,
    verdict,
    worst_ratio,
    write_report,
)
from loadtest.thrash import report as thrash

MODE_LABELS = {"merged": "merged", "adapter_1": "adapter-only, 1 adapter", "adapter_n": "adapter-only, N"}
MODE_LABELS |= thrash.LABELS
MULTI_TARGET = 0.9


def _point(entry: dict[str, Any]) -> dict[str, Any]:
    s = entry["summary"]
    out = {
        "completed": s["requests"]["completed"],
        "failed": s["requests"]["failed"],
        "request_throughput": s["request_throughput"],
        "output_token_throughput": s["output_token_throughput"],
        "ttft_p50_ms": s["ttft_ms"]["p50"],
        "ttft_p99_ms": s["ttft_ms"]["p99"],
        "tpot_p50_ms": s["tpot_ms"]["p50"],
        "e2e_p99_ms": s["e2e_ms"]["p99"],
    }
    for key in ("adapter_loads", "adapter_evictions", "adapter_load_errors", "loads_per_1000_requests"):
        if key in entry:
            out[key] = entry[key]
    if "verify" in entry:
        out["checked"], out["wrong"] = entry["verify"]["checked"], entry["verify"]["wrong"]
        out["wrong_model"], out["near_ties"] = entry["verify"]["wrong_model"], entry["verify"]["near_ties"]
    return out


def summarize_compare(payload: dict[str, Any]) -> dict[str, Any]:
    """Per concurrency: each mode's point and the ratios; memory totals; the targets' verdicts."""
    modes = payload["modes"]
    n = len(payload["config"]["adapters"])
    rows = []
    for i, c in enumerate(payload["config"]["concurrency"]):
        pts = {m: _point(levels[i]) for m, levels in modes.items() if i < len(levels)}
        m, a1, an = (pts.get(k) for k in ("merged", "adapter_1", "adapter_n"))

        def r(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
            return ratio(a and a[key], b and b[key])

        ratios = {
            "throughput_adapter_1_vs_merged": r(a1, m, "output_token_throughput"),
            "throughput_adapter_n_vs_merged": r(an, m, "output_token_throughput"),
            "throughput_adapter_n_vs_adapter_1": r(an, a1, "output_token_throughput"),
            "ttft_p50_adapter_1_vs_merged": r(a1, m, "ttft_p50_ms"),
            "ttft_p99_adapter_1_vs_merged": r(a1, m, "ttft_p99_ms"),
            "ttft_p99_adapter_n_vs_merged": r(an, m, "ttft_p99_ms"),
            "tpot_p50_adapter_1_vs_merged": r(a1, m, "tpot_p50_ms"),
            "tpot_p50_adapter_n_vs_merged": r(an, m, "tpot_p50_ms"),
            **thrash.thrash_ratios(pts, r),
        }
        rows.append({"concurrency": c, "modes": pts, "ratios": ratios})
    procs = payload["memory"]["processes"]
    files = payload["memory"]["files"]
    memory: dict[str, Any] = {"n": n}
    for key in ("rss_bytes", "pss_bytes", "gpu_bytes"):
        merged = procs.get("merged", {}).get(key)
        lora = procs.get("lora", {}).get(key)
        memory[key] = {
            "one_merged": merged,
            "n_merged": None if merged is None else n * merged,
            "base_plus_n_adapters": lora,
            "ratio": ratio(None if merged is None else n * merged, lora),
        }
    adapters_total = sum(files["adapter_bytes"].values())
    one = files["merged_bytes"]
    memory["file_bytes"] = {
        "one_merged": one,
        "n_merged": None if one is None else n * one,
        "base_plus_n_adapters": files["base_bytes"] + adapters_total,
        "adapters": adapters_total,
        "ratio": ratio(None if one is None else n * one, files["base_bytes"] + adapters_total),
    }

    targets: dict[str, Any] = {
        "adapter_n_vs_adapter_1_throughput_min": worst_ratio(rows, "throughput_adapter_n_vs_adapter_1", min),
        "adapter_n_vs_adapter_1_target": MULTI_TARGET,
        **thrash.thrash_targets(modes, rows),
    }
    return {"per_concurrency": rows, "memory": memory, "targets": targets}


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f} MiB"


def render_compare_markdown(payload: dict[str, Any]) -> str:
    cfg, summ = payload["config"], payload["summary"]
    n = len(cfg["adapters"])
    names = [Path(a).name for a in cfg["adapters"]]
    present = [m for m in MODE_LABELS if m in payload["modes"]]
    eager = "" if cfg.get("lora_compile", True) else "; LoRA model eager, --no-lora-compile"
    out = [
        "# Merged vs adapter-only serving",
        "",
        f"- Base `{cfg['base']}` (served as `{cfg['base_name'] or Path(cfg['base']).name}`); {n} adapters "
        f"({', '.join(names[:4])}{', ...' if n > 4 else ''})"
        + (f"; merged: `{names[0]}` into the base" if "merged" in present else ""),
        "- Modes: "
        + (
            "merged = vLLM without --enable-lora on the merged model, behind its own gateway; "
            if "merged" in present
            else ""
        )
        + f"adapter-only = the gateway over vLLM --enable-lora (max_loras {cfg['max_loras'] or n}, "
        f"max_cpu_loras {n}{eager}) with {'1 adapter, and with ' if 'adapter_1' in present else ''}"
        f"all {n} under `{cfg['mix']}`" + thrash.modes_text(cfg, present),
        f"- Closed loop, concurrency {', '.join(str(c) for c in cfg['concurrency'])}; {cfg['requests']} "
        f"streaming requests per level{_repeats(cfg)}, prompt ~{cfg['prompt_tokens']} tokens, "
        f"max_tokens {cfg['max_tokens']}"
        f"{' (ignore_eos)' if cfg['ignore_eos'] else ''}",
        f"- Started {payload['started_at']}, finished {payload['finished_at']}",
        *machine_lines(payload["machine"]),
        "",
        "## Throughput (output tokens/s) and ratios",
        "",
    ]
    head = ["concurrency", *[MODE_LABELS[m] for m in present], "adapter-1 / merged", f"adapter-{n} / merged"]
    head.append(f"adapter-{n} / adapter-1")
    rows = []
    for row in summ["per_concurrency"]:
        rt = row["ratios"]
        cells: list[Any] = [row["concurrency"]]
        cells += [row["modes"].get(m, {}).get("output_token_throughput") for m in present]
        cells += [times(rt["throughput_adapter_1_vs_merged"]), times(rt["throughput_adapter_n_vs_merged"])]
        cells.append(times(rt["throughput_adapter_n_vs_adapter_1"]))
        rows.append(cells)
    out += [table(head, rows), ""]
    out += ["## Latency (ms): TTFT p50 / p99, TPOT p50", ""]
    head = ["concurrency", "mode", "req/s", "TTFT p50", "TTFT p99", "TPOT p50", "E2E p99", "failed"]
    head += ["TTFT p99 / merged", "TPOT p50 / merged"]
    rows = []
    for row in summ["per_concurrency"]:
        base = row["modes"].get("merged", {})
        for m in present:
            p = row["modes"].get(m)
            if p is None:
                continue
            rows.append(
                [
                    row["concurrency"],
                    MODE_LABELS[m],
                    p["request_throughput"],
                    p["ttft_p50_ms"],
                    p["ttft_p99_ms"],
                ]
                + [p["tpot_p50_ms"], p["e2e_p99_ms"], p["failed"]]
                + [times(ratio(p["ttft_p99_ms"], base.get("ttft_p99_ms")))]
                + [times(ratio(p["tpot_p50_ms"], base.get("tpot_p50_ms")))]
            )
    out += [table(head, rows), ""]
    checked = [
        [row["concurrency"], MODE_LABELS[m], p["checked"], p["near_ties"], p["wrong"], p["wrong_model"]]
        for row in summ["per_concurrency"]
        for m in present
        if (p := row["modes"].get(m, {})) and "checked" in p
    ]
    if checked:
        out += ["## Answers checked (`--verify`)", ""]
        out += [
            "Each answer against its model's own answer to that request sent alone to the same server "
            "(greedy); *another model's* = equal to a different model's answer; a *near tie* differs where "
            "the reference's two best tokens were within 0.1 nats, and is not counted wrong.",
            "",
        ]
        head = ["concurrency", "mode", "checked", "near ties", "wrong", "another model's"]
        out += [table(head, checked), ""]
        out += [
            f"**{sum(r[4] for r in checked)} wrong answers** of {sum(r[2] for r in checked)} checked "
            f"({sum(r[3] for r in checked)} near ties: the reference's two best tokens within 0.1 nats).",
            "",
        ]
    out += ["## Adapter loads and evictions during each level (gateway /metrics)", ""]
    rows = []
    for row in summ["per_concurrency"]:
        for m in present:
            p = row["modes"].get(m, {})
            if "adapter_loads" in p:
                rows.append(
                    [row["concurrency"], MODE_LABELS[m], p["completed"], p["adapter_loads"]]
                    + [p["adapter_evictions"], p["adapter_load_errors"], p["loads_per_1000_requests"]]
                )
    head = [
        "concurrency",
        "mode",
        "completed",
        "loads",
        "evictions",
        "load errors",
        "loads per 1000 requests",
    ]
    out += [table(head, rows), ""]
    t = summ["targets"]
    out += ["## Targets", ""]
    trows = [
        [
            f"{n} adapters under `{cfg['mix']}`: throughput >= {MULTI_TARGET:.0%} of one adapter's "
            "(worst concurrency)",
            times(t["adapter_n_vs_adapter_1_throughput_min"]),
            verdict(t["adapter_n_vs_adapter_1_throughput_min"], MULTI_TARGET, at_least=True),
        ],
        *thrash.target_rows(t, cfg),
    ]
    out += [table(["target", "measured", "verdict"], trows), ""]
    out += _spread(payload, present)
    mem = summ["memory"]
    out += [
        "## Memory",
        "",
        f"N = {n}. Process memory is summed over each vLLM's process tree (API server, engine core, "
        "workers) after its runs; RSS counts shared pages once per process, PSS splits them. "
        "N merged models are N copies of the one measured.",
        "",
    ]
    rows = []
    for key, label, unit in (
        ("rss_bytes", "process RSS", _gib),
        ("pss_bytes", "process PSS", _gib),
        ("gpu_bytes", "GPU memory", _gib),
        ("file_bytes", "files on disk", _mib),
    ):
        d = mem[key]
        if d["one_merged"] is None and d["base_plus_n_adapters"] is None:
            continue
        rows.append([label, unit(d["one_merged"]), unit(d["n_merged"]), unit(d["base_plus_n_adapters"])])
        rows[-1].append(times(d["ratio"]))
    head = ["what", "one merged model", f"{n} merged models", f"one base + {n} adapters", "ratio"]
    out += [table(head, rows), ""]
    out += [
        "## Plots",
        "",
        "![throughput](compare_throughput.png)",
        "",
        "![ttft p99](compare_ttft_p99.png)",
        "",
    ]
    return "\n".join(out)


def _repeats(cfg: dict[str, Any]) -> str:
    r = cfg.get("repeat") or 1
    return f", each level measured {r} times (numbers pool all {r * cfg['requests']})" if r > 1 else ""


def _spread(payload: dict[str, Any], present: list[str]) -> list[str]:
    """Each repeat's TTFT p99 beside the pooled one: how much one run of a level can be trusted."""
    if (payload["config"].get("repeat") or 1) < 2:
        return []
    rows = []
    for m in present:
        for lv in payload["modes"][m]:
            reps = lv.get("repeats") or []
            rows.append(
                [lv["level"], MODE_LABELS[m], " / ".join(fmt(r["ttft_p99_ms"], 0) for r in reps)]
                + [lv["summary"]["ttft_ms"]["p99"]]
            )
    head = ["concurrency", "mode", "TTFT p99 of each repeat (ms)", "pooled TTFT p99 (ms)"]
    return ["## Spread over repeats", "", table(head, rows), ""]


def plot_compare(payload: dict[str, Any], out_dir: Path) -> list[Path]:
    """``compare_throughput.png`` (req/s and tok/s) and ``compare_ttft_p99.png``, one line per mode."""
    plt = pyplot()
    rows = payload["summary"]["per_concurrency"]
    labels = {m: label for m, label in MODE_LABELS.items() if m in payload["modes"]}
    styles = dict(zip(MODE_LABELS, ("o-", "s--", "^-.", "d:", "v--"), strict=True))

    def panel(ax: Any, key: str, title: str) -> None:
        concurrency_panel(ax, rows, "modes", labels, styles, key, title)

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panel(axes[0], "request_throughput", "requests/s")
    panel(axes[1], "output_token_throughput", "output tokens/s")
    fig.suptitle("Throughput vs concurrency, per mode")
    fig.tight_layout()
    paths.append(out_dir / "compare_throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    panel(ax, "ttft_p99_ms", "p99 TTFT (ms) vs concurrency, per mode")
    fig.tight_layout()
    paths.append(out_dir / "compare_ttft_p99.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_compare_report(out_dir: Path, payload: dict[str, Any]) -> dict[str, Path]:
    return write_report(out_dir, payload, render_compare_markdown, plot_compare)
