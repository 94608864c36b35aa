"""Files a run leaves behind: ``results.json``, ``requests.jsonl``, ``report.md`` and PNG plots.

The markdown and plots are rendered from the ``results.json`` payload alone, so a report can be
re-rendered later (``render_run_markdown(json.load(...))``). Matplotlib is imported inside the
plotting functions, with the Agg backend. The pieces every scenario's report is made of (tables,
ratios, one line per mode against concurrency, the files written) are here too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from loadtest.harness.records import RequestResult

LATENCY_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency"))
MODE_LABEL = {"concurrency": "concurrency", "rate": "offered rate (req/s)"}


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def write_requests(path: Path, records: Iterable[tuple[Any, Sequence[RequestResult]]]) -> Path:
    """Per-request records, one JSON object a line, each with its ``level``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for level, recs in records:
            for r in recs:
                f.write(json.dumps({"level": level, **r.to_dict()}) + "\n")
    return path


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, None when either is missing or ``b`` is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def times(v: float | None) -> str:
    """A ratio in a table: ``1.23x``, "-" when there is none."""
    return "-" if v is None else f"{v:.2f}x"


def worst_ratio(rows: Iterable[dict[str, Any]], key: str, pick: Any) -> float | None:
    """``pick`` (``min`` or ``max``) of ``row["ratios"][key]`` over a summary's rows; None if none."""
    return pick((v for x in rows if (v := x["ratios"][key]) is not None), default=None)


def verdict(v: float | None, limit: float, *, at_least: bool) -> str:
    """A target's verdict: met, missed by how much, or not measured."""
    if v is None:
        return "not measured"
    ok = v >= limit if at_least else v <= limit
    return "met" if ok else f"missed by {abs(v - limit):.2f}"


def level_name(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_lines(m: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    return [
        f"- CPU: {m.get('cpu_model')} ({m.get('cpu_usable')} usable of {m.get('cpu_count')}), "
        f"memory {m.get('memory_gib')} GiB, load average at the end {m.get('load_average')}",
        f"- Platform: {m.get('platform')}, Python {m.get('python')}",
        f"- Versions: {versions}",
    ]


def render_run_markdown(payload: dict[str, Any]) -> str:
    cfg, wl = payload["config"], payload["config"]["workload"]
    mode = cfg["mode"]
    levels = payload["levels"]
    out = [
        "# Load test report",
        "",
        f"- Target: `{cfg['target']}` ({wl['endpoint']}, {'streaming' if wl['stream'] else 'non-streaming'})",
        f"- Models: {', '.join(wl['models'])}; mix `{wl['mix']}`; seed {wl['seed']}",
        f"- {'Closed loop, concurrency' if mode == 'concurrency' else 'Open loop (Poisson), offered rate'} "
        f"{', '.join(level_name(x) for x in cfg['levels'])}; {cfg['requests']} requests per level, "
        f"time limit {cfg['time_limit_s']:g} s per level, request timeout {cfg['timeout_s']:g} s",
        f"- Prompt about {wl['prompt_tokens']} tokens (synthetic words), max_tokens {wl['max_tokens']}"
        f"{', ignore_eos' if wl['ignore_eos'] else ''}",
        f"- Started {payload['started_at']}, finished {payload['finished_at']}",
        *machine_lines(payload["machine"]),
        "",
        "## Throughput",
        "",
    ]
    head = [mode, "completed", "failed", "not sent", "duration (s)", "request throughput (req/s)"]
    head += ["output token throughput (tok/s)", "mean prompt tokens", "mean completion tokens"]
    if mode == "rate":
        head.append("send lag p99 (ms)")
    rows = []
    for lv in levels:
        s = lv["summary"]
        n = s["requests"]["completed"] or 1
        row = [level_name(lv["level"]), s["requests"]["completed"], s["requests"]["failed"]]
        row += [s["requests"]["not_sent"], s["duration_s"], s["request_throughput"]]
        row += [s["output_token_throughput"], s["total_input_tokens"] / n, s["total_output_tokens"] / n]
        if mode == "rate":
            row.append(s["send_lag_ms"]["p99"])
        rows.append(row)
    out += [table(head, rows), "", "## Latency (ms)", ""]
    rows = []
    for lv in levels:
        for key, label in LATENCY_METRICS:
            d = lv["summary"][key]
            if d["count"]:
                row = [level_name(lv["level"]), label, d["mean"], d["p50"], d["p90"], d["p99"], d["count"]]
                rows.append(row)
    out += [table([mode, "metric", "mean", "p50", "p90", "p99", "samples"], rows), ""]
    if not wl["stream"]:
        out += ["TTFT, TPOT and ITL need `--stream`; without it only end-to-end latency is measured.", ""]
    errors = [(level_name(lv["level"]), k, v) for lv in levels for k, v in lv["summary"]["errors"].items()]
    out += ["## Errors", ""]
    out += [table([mode, "kind", "count"], errors) if errors else "No failed requests.", ""]
    if "verify" in payload:
        out += verify_section(mode, levels)
    out += ["## Per model", ""]
    rows = []
    for lv in levels:
        for model, s in lv["per_model"].items():
            rows.append(
                [level_name(lv["level"]), model, s["requests"]["completed"], s["requests"]["failed"]]
                + [s["request_throughput"], s["output_token_throughput"], s["ttft_ms"]["p99"]]
                + [s["tpot_ms"]["p50"], s["e2e_ms"]["p50"], s["e2e_ms"]["p99"]]
            )
    head = [mode, "model", "completed", "failed", "req/s", "output tok/s", "TTFT p99", "TPOT p50"]
    out += [table(head + ["E2E p50", "E2E p99"], rows), ""]
    out += ["## Plots", "", f"![latency](latency_vs_{mode}.png)", ""]
    out += [f"![throughput](throughput_vs_{mode}.png)", ""]
    return "\n".join(out)


def verify_section(mode: str, levels: list[dict[str, Any]]) -> list[str]:
    """``--verify``: per level and model, answers checked against the model's own answer sent alone."""
    out = ["## Answers checked (`--verify`)", ""]
    out += [
        "Each answer is compared with the answer its model gives to the same request sent alone "
        "(greedy). *Near ties* left the reference by taking another token within "
        f"{levels[0]['verify']['tie_nats']:g} nats of the reference's (engines are not batch-invariant: a "
        "larger batch sums in another order, in bfloat16 on vLLM's CPU engine); they are not counted as "
        "wrong. *Another model's* counts wrong answers that equal a different model's answer to that "
        "request: the signature of a request served by the wrong weights.",
        "",
    ]
    rows = []
    for lv in levels:
        for model, c in lv["verify"]["per_model"].items():
            others = ", ".join(f"{m} {n}" for m, n in c["as_model"].items()) or "-"
            rows.append([level_name(lv["level"]), model, c["checked"], c["near_ties"], c["wrong"], others])
    out += [table([mode, "model", "checked", "near ties", "wrong", "another model's"], rows), ""]
    total = sum(lv["verify"]["wrong"] for lv in levels)
    out += [f"**{total} wrong answers** of {sum(lv['verify']['checked'] for lv in levels)} checked.", ""]
    examples = [e for lv in levels for e in lv["verify"]["examples"]][:5]
    if examples:
        out += ["Examples:", ""]
        out += [f"- #{e['index']} {e['model']}: `{e['text']}` (alone: `{e['reference']}`)" for e in examples]
        out += [""]
    return out


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), imported when first plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(levels: list[dict[str, Any]], key: str, stat: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for lv in levels:
        v = lv["summary"][key][stat] if isinstance(lv["summary"][key], dict) else lv["summary"][key]
        if v is not None:
            xs.append(lv["level"])
            ys.append(v)
    return xs, ys


def level_axis(ax: Any, xs: Sequence[float]) -> None:
    """Ticks at the measured levels, labelled plainly (log base 2 when they span 8x or more)."""
    if len(xs) > 1 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    ax.set_xticks(xs, [level_name(x) for x in xs])


def concurrency_panel(
    ax: Any,
    rows: Sequence[dict[str, Any]],
    group: str,
    labels: dict[str, str],
    styles: dict[str, str],
    key: str,
    title: str,
) -> None:
    """``key`` against concurrency, one line per member of ``row[group]`` (a scenario's modes or policies)
    named in ``labels``, from a summary's ``per_concurrency`` rows."""
    for m in labels:
        pts = [(r["concurrency"], r[group][m][key]) for r in rows if r[group].get(m, {}).get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[m], label=labels[m])
    ax.set(title=title, xlabel="concurrency")
    level_axis(ax, [r["concurrency"] for r in rows])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_report(
    out_dir: Path,
    payload: dict[str, Any],
    render: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], list[Path]],
) -> dict[str, Path]:
    """A scenario's files in ``out_dir``: ``results.json``, ``report.md`` (``render``), the plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"results": write_json(out_dir / "results.json", payload)}
    files["report"] = out_dir / "report.md"
    files["report"].write_text(render(payload), encoding="utf-8")
    for p in plot(payload, out_dir):
        files[p.stem] = p
    return files


def plot_run(payload: dict[str, Any], out_dir: Path) -> list[Path]:
    """``latency_vs_<mode>.png`` and ``throughput_vs_<mode>.png``."""
    plt = pyplot()
    mode, levels = payload["config"]["mode"], payload["levels"]
    xlabel = MODE_LABEL[mode]
    metrics = [(k, label) for k, label in LATENCY_METRICS if any(lv["summary"][k]["count"] for lv in levels)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics, strict=True):
        for stat, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(*_series(levels, key, stat), style, label=stat)
        ax.set(title=f"{label} (ms)", xlabel=xlabel)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        level_axis(ax, [lv["level"] for lv in levels])
        ax.legend()
    fig.suptitle(f"Latency vs {xlabel}")
    fig.tight_layout()
    paths = [out_dir / f"latency_vs_{mode}.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
    panels = (("request_throughput", "requests/s"), ("output_token_throughput", "output tokens/s"))
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        ax.plot(*_series(levels, key, ""), "o-")
        if mode == "rate":
            xs = [lv["level"] for lv in levels]
            if key == "request_throughput":
                ax.plot(xs, xs, "k:", label="offered")
                ax.legend()
        ax.set(title=label, xlabel=xlabel)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        level_axis(ax, [lv["level"] for lv in levels])
    fig.suptitle(f"Throughput vs {xlabel}")
    fig.tight_layout()
    paths.append(out_dir / f"throughput_vs_{mode}.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def write_run_report(
    out_dir: Path, payload: dict[str, Any], records: Iterable[tuple[Any, Sequence[RequestResult]]] = ()
) -> dict[str, Path]:
    """Write every file of a ``run`` into ``out_dir``; returns them by role."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"results": write_json(out_dir / "results.json", payload)}
    files["requests"] = write_requests(out_dir / "requests.jsonl", records)
    files["report"] = out_dir / "report.md"
    files["report"].write_text(render_run_markdown(payload), encoding="utf-8")
    for p in plot_run(payload, out_dir):
        files[p.stem] = p
    return files
