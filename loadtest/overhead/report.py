"""The overhead run's files: ``results.json``, ``requests.jsonl``, ``report.md`` and two PNGs,
rendered from the payload of :func:`loadtest.overhead.run.run_overhead` alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.harness.report import level_name, machine_lines, pyplot, table, write_json, write_requests


def render_overhead_markdown(payload: dict[str, Any]) -> str:
    cfg = payload["config"]
    out = [
        "# Gateway overhead",
        "",
        f"- Direct: `{cfg['direct_url']}`; gateway: `{cfg['gateway_url']}`; model `{cfg['model']}`"
        f" (through the gateway `{cfg['gateway_model']}`)",
        f"- Open loop (Poisson), {cfg['duration_s']:g} s per level, each path at the offered rate; "
        f"{cfg['interleaving']}; client {cfg['client']}",
        f"- Prompt about {cfg['prompt_tokens']} tokens, max_tokens {cfg['max_tokens']}; "
        f"sustained = gateway p99 e2e < {cfg['p99_target_ms']:g} ms, errors <= {cfg['max_error_rate']:.2%}",
        f"- Started {payload['started_at']}, finished {payload['finished_at']}",
        *machine_lines(payload["machine"]),
        "",
        "## Most requests per second sustained",
        "",
        table(
            ["mode", f"max rate with p99 < {cfg['p99_target_ms']:g} ms (req/s)"],
            [[m, "none" if r is None else level_name(r)] for m, r in payload["max_sustained_rate"].items()],
        ),
        "",
    ]
    sections = (("nonstream", (("e2e_ms", "e2e"),)), ("stream", (("ttfb_ms", "TTFB"), ("itl_ms", "ITL"))))
    for mode, metrics in sections:
        lvs = [lv for lv in payload["levels"] if lv["mode"] == mode]
        if not lvs:
            continue
        out += [f"## Added latency, {'non-streaming' if mode == 'nonstream' else 'streaming'} (ms)", ""]
        head = ["rate (req/s)", "achieved direct / gateway"]
        rows = []
        for _, label in metrics:
            head += [f"{label} p50 direct", f"{label} p50 gateway", "added p50", "added p99"]
        head += ["errors (d/g)", "send lag p99", "sustained"]
        for lv in lvs:
            d, g = lv["direct"], lv["gateway"]
            achieved = f"{d['request_throughput']:.0f} / {g['request_throughput']:.0f}"
            row: list[Any] = [level_name(lv["rate"]), achieved]
            for key, _ in metrics:
                row += [d[key]["p50"], g[key]["p50"], lv["added_ms"][key]["p50"], lv["added_ms"][key]["p99"]]
            row += [f"{d['requests']['failed']}/{g['requests']['failed']}", lv["send_lag_p99_ms"]]
            verdict = "yes" if lv["sustained"] else f"no: {lv['reason']}"
            if lv["limited_by"]:
                verdict += f" ({lv['limited_by']})"
            row.append(verdict)
            rows.append(row)
        out += [table(head, rows), ""]
    out += _others_markdown(payload)
    out += ["## Plots", "", "![added latency](overhead_added_latency.png)", ""]
    out += ["![p99](overhead_p99.png)", ""]
    return "\n".join(out)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, None when either is missing or ``b`` is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _rate(r: float | None) -> str:
    return "none" if r is None else level_name(r)


def _others_markdown(payload: dict[str, Any]) -> list[str]:
    """Other proxies measured in the same run: their added latency next to the gateway's."""
    cfg = payload["config"]
    out: list[str] = []
    for tag in cfg.get("others", {}):
        best = payload["others_max_sustained_rate"][tag]
        out += [f"## {tag} in the same run", ""]
        rows = []
        for mode, r in best.items():
            g = payload["max_sustained_rate"].get(mode)
            rows.append([mode, _rate(r), _rate(g)])
        head = ["mode", f"{tag}: max rate with p99 < {cfg['p99_target_ms']:g} ms", "gateway (this run)"]
        out += [table(head, rows), ""]
        head = ["rate", "mode", "metric", "added p50 gateway", f"added p50 {tag}", "ratio p50"]
        head += ["added p99 gateway", f"added p99 {tag}", "ratio p99", f"{tag} errors", f"{tag} sustained"]
        rows = []
        for lv in payload["levels"]:
            other = lv["others"][tag]
            key = "e2e_ms" if lv["mode"] == "nonstream" else "ttfb_ms"
            g, o = lv["added_ms"][key], other["added_ms"][key]
            verdict = "yes" if other["sustained"] else f"no: {other['reason']}"
            rows.append(
                [level_name(lv["rate"]), lv["mode"], key[:-3], g["p50"], o["p50"], ratio(o["p50"], g["p50"])]
                + [g["p99"], o["p99"], ratio(o["p99"], g["p99"]), other["summary"]["requests"]["failed"]]
                + [verdict]
            )
        out += [table(head, rows), ""]
    return out


def plot_overhead(payload: dict[str, Any], out_dir: Path) -> list[Path]:
    """``overhead_added_latency.png`` (added p50/p99 vs rate) and ``overhead_p99.png`` (both paths)."""
    plt = pyplot()
    panels = [
        ("nonstream", "e2e_ms", "non-stream e2e"),
        ("stream", "ttfb_ms", "stream TTFB"),
        ("stream", "itl_ms", "stream ITL"),
    ]
    panels = [p for p in panels if any(lv["mode"] == p[0] for lv in payload["levels"])]
    paths = []
    for name, draw in (("overhead_added_latency", _draw_added), ("overhead_p99", _draw_p99)):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (mode, key, title) in zip(axes[0], panels, strict=True):
            lvs = sorted((lv for lv in payload["levels"] if lv["mode"] == mode), key=lambda lv: lv["rate"])
            draw(ax, lvs, key)
            ax.set(title=title, xlabel="offered rate per path (req/s)", ylabel="ms")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        paths.append(out_dir / f"{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _draw_added(ax: Any, lvs: list[dict[str, Any]], key: str) -> None:
    for stat, style in (("p50", "o-"), ("p99", "^:")):
        pts = [(lv["rate"], lv["added_ms"][key][stat]) for lv in lvs if lv["added_ms"][key][stat] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"added {stat}")
    ax.axhline(0, color="k", lw=0.5)


def _draw_p99(ax: Any, lvs: list[dict[str, Any]], key: str) -> None:
    for side, style in (("direct", "o-"), ("gateway", "s--")):
        pts = [(lv["rate"], lv[side][key]["p99"]) for lv in lvs if lv[side][key]["p99"] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{side} p99")
    for tag in sorted({t for lv in lvs for t in lv.get("others", {})}):
        pts = [
            (lv["rate"], v)
            for lv in lvs
            if tag in lv.get("others", {}) and (v := lv["others"][tag]["summary"][key]["p99"]) is not None
        ]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "^:", label=f"{tag} p99")
    ax.set_ylim(bottom=0)


def write_overhead_report(out_dir: Path, payload: dict[str, Any]) -> dict[str, Path]:
    """``results.json``, ``requests.jsonl`` (if records were kept), ``report.md`` and two PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = payload.pop("_records", None)
    files = {"results": write_json(out_dir / "results.json", payload)}
    if records is not None:
        files["requests"] = write_requests(out_dir / "requests.jsonl", records)
    files["report"] = out_dir / "report.md"
    files["report"].write_text(render_overhead_markdown(payload), encoding="utf-8")
    for p in plot_overhead(payload, out_dir):
        files[p.stem] = p
    return files
