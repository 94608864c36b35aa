"""The self-managed overhead run's top-level ``results.json`` and ``report.md``: the issue's targets
next to what was measured, and the closed-loop numbers (each part's own report is in its folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.harness.report import fmt, level_name, machine_lines, table, write_json

PARTS = {
    "fast": "fast upstream: direct vs gateway (open loop)",
    "litellm": "fast upstream: direct vs gateway vs LiteLLM (open loop)",
    "paced": "paced upstream (a chunk every few ms): streaming inter-chunk gap, direct vs gateway",
    "vllm": "real vLLM (embedded tiny model, CPU): direct vs gateway (open loop)",
}


def _met(value: float | None, limit: float, *, at_most: bool = True) -> str:
    if value is None:
        return "not measured"
    ok = value <= limit if at_most else value >= limit
    if ok:
        return "met"
    return f"missed by {abs(value - limit):,.2f}"


def _same(direct: float | None, gateway: float | None, tolerance: float = 0.05) -> str:
    """Inter-chunk gaps 'unchanged within noise': the gateway's p50 within 5% of the direct one."""
    if direct is None or gateway is None or direct <= 0:
        return "not measured"
    rel = (gateway - direct) / direct
    return f"{'met' if abs(rel) <= tolerance else 'missed'} ({rel:+.1%})"


def _rate(r: float | None) -> str:
    return "none" if r is None else level_name(r)


def target_rows(t: dict[str, Any]) -> list[list[Any]]:
    """Target, measured, verdict."""
    rows: list[list[Any]] = []
    if "added_p50_ms_at_200" in t:
        p50, p99 = t["added_p50_ms_at_200"], t["added_p99_ms_at_200"]
        rows.append(["added p50 at 200 req/s (non-streaming) <= 0.5 ms", fmt(p50, 3), _met(p50, 0.5)])
        rows.append(["added p99 at 200 req/s (non-streaming) <= 2 ms", fmt(p99, 3), _met(p99, 2.0)])
        sp50, sp99 = t["stream_added_ttfb_p50_ms_at_200"], t["stream_added_ttfb_p99_ms_at_200"]
        rows.append(["added TTFB p50 at 200 req/s (streaming) <= 0.5 ms", fmt(sp50, 3), _met(sp50, 0.5)])
        rows.append(["added TTFB p99 at 200 req/s (streaming) <= 2 ms", fmt(sp99, 3), _met(sp99, 2.0)])
        top = max(t["tested_rates"])
        for mode, rate in t["max_sustained_rate"].items():
            shown = "none" if rate is None else level_name(rate)
            if rate is not None and rate == top:
                shown += " (highest rate tried)"
            label = f"one gateway sustains >= 1,000 req/s with p99 < {t['p99_target_ms']:g} ms ({mode})"
            rows.append([label, shown, _met(rate, 1000, at_most=False) if rate is not None else "missed"])
        itl = t["stream_added_itl_p50_ms_at_200"]
        rows.append(["fast upstream: added inter-chunk gap p50 at 200 req/s", fmt(itl, 3), "see below"])
    for r in t.get("paced_stream_itl", []):
        d, g = r["itl_p50_direct_ms"], r["itl_p50_gateway_ms"]
        d99, g99 = r["itl_p99_direct_ms"], r["itl_p99_gateway_ms"]
        rows.append(
            [
                f"stream paced at {r['itl_ms']:g} ms/chunk, {level_name(r['rate'])} req/s: inter-chunk gap "
                "p50 / p99, direct vs gateway (ms)",
                f"{fmt(d)} / {fmt(d99)} vs {fmt(g)} / {fmt(g99)}",
                _same(d, g),
            ]
        )
    for r in t.get("vllm_stream_itl", []):
        d, g = r["itl_p50_direct_ms"], r["itl_p50_gateway_ms"]
        rel = None if d in (None, 0) or g is None else (g - d) / d
        rows.append(
            [
                f"real vLLM at {level_name(r['rate'])} req/s: inter-chunk gap p50 direct / gateway (ms)",
                f"{fmt(d)} / {fmt(g)}" + ("" if rel is None else f" ({rel:+.1%})"),
                "-",
            ]
        )
    lite = t.get("litellm")
    if lite:
        best = [r for r in lite["levels"] if r["rate"] == 200 and r["mode"] == "nonstream"]
        for r in best:
            rows.append(
                [
                    f"LiteLLM {lite['version']} added p50 at 200 req/s / gateway's",
                    f"{fmt(r['litellm_added_p50_ms'])} / {fmt(r['gateway_added_p50_ms'])} ms "
                    f"= {fmt(r['ratio_p50'], 1)}x",
                    "-",
                ]
            )
        for mode, rate in lite["max_sustained_rate"].items():
            g = t.get("max_sustained_rate", {}).get(mode)
            ratio = None if not rate or not g else g / rate
            rows.append(
                [
                    f"max req/s with p99 < {t.get('p99_target_ms', 50):g} ms, gateway / LiteLLM ({mode})",
                    f"{_rate(g)} / {_rate(rate)}" + ("" if ratio is None else f" = {ratio:.1f}x"),
                    "-",
                ]
            )
    return rows


def render_suite_markdown(payload: dict[str, Any]) -> str:
    cfg = payload["config"]
    out = [
        "# Gateway overhead",
        "",
        f"- Started {payload['started_at']}, finished {payload['finished_at']}",
        *machine_lines(payload["machine"]),
        f"- Open loop: {cfg['duration_s']:g} s per rate and mode, prompt ~{cfg['prompt_tokens']} tokens, "
        f"max_tokens {cfg['max_tokens']}, client {cfg['client']}",
        "",
        "Parts (each has its own report and plots):",
        "",
    ]
    out += [
        f"- [{PARTS[k]}]({path.replace('results.json', 'report.md')})" for k, path in payload["parts"].items()
    ]
    out += [
        "",
        "## Targets",
        "",
        table(["target", "measured", "verdict"], target_rows(payload["targets"])),
        "",
    ]
    closed = payload["closed_loop"]
    if closed:
        procs = sorted({k for e in closed for k in e["cpu_us_per_request"]})
        out += [
            "## Closed loop (fixed concurrency): CPU share, not proxy latency",
            "",
            f"Each path alone, {cfg['closed_requests']} non-streaming requests per level (at most "
            f"{cfg['closed_time_limit_s']:g} s). The load "
            f"generator, the upstream and the proxy share {payload['machine'].get('cpu_usable')} cores, "
            "so throughput here is bounded by how the cores are shared; the CPU each process spent per "
            "request is the number that carries over to other machines.",
            "",
        ]
        head = ["path", "concurrency", "completed", "req/s", "e2e p50 (ms)", "e2e p99 (ms)", "failed"]
        head += [f"CPU us/req {p}" for p in procs]
        rows = []
        for e in closed:
            s = e["summary"]
            row = [
                e["path"],
                e["concurrency"],
                s["requests"]["completed"],
                s["request_throughput"],
                s["e2e_ms"]["p50"],
                s["e2e_ms"]["p99"],
            ]
            row += [s["requests"]["failed"]] + [e["cpu_us_per_request"].get(p) for p in procs]
            rows.append(row)
        out += [table(head, rows), ""]
    return "\n".join(out)


def write_suite_report(out_dir: Path, payload: dict[str, Any]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"results": write_json(out_dir / "results.json", payload)}
    files["report"] = out_dir / "report.md"
    files["report"].write_text(render_suite_markdown(payload), encoding="utf-8")
    return files
