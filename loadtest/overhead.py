"""What a proxy adds: the same workload sent directly to an upstream and through the gateway.

For each offered rate R (open loop, Poisson) and each mode (non-streaming, streaming), the
requests go to both paths interleaved in one stream of arrivals at 2R req/s: request i is sent
once directly and once through the gateway, each path receiving R req/s, with the order inside
each pair alternating. Both paths share the generator, the machine and the moment, so their
difference is what the gateway adds:

- non-streaming: end-to-end latency
- streaming: time to first byte (first SSE event) and the inter-chunk gap (ITL)

reported as ``gateway - direct`` for mean, p50, p90 and p99 (milliseconds).

A level is *sustained* when the gateway path has p99 end-to-end latency under
``p99_target_ms``, at most ``max_error_rate`` failures, and every request was sent (the time
limit did not cut the schedule). ``max_sustained_rate`` is the highest sustained rate below
the first one that is not. A level that is not sustained names what limited it (``limited_by``): the
load generator when it could not send on schedule (send lag p99 over max(5 ms, target/10)),
the upstream or the machine when the direct path missed too, else the gateway. On a small
machine the generator shares the cores with what it measures, hence the aiohttp client by
default here (``client``; several times less CPU per request than httpx).

    from loadtest.overhead import run_overhead, write_overhead_report
    result = run_overhead("http://127.0.0.1:8001", "http://127.0.0.1:8000", [50, 200, 500], 10)
    write_overhead_report(Path("out/overhead"), result)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadtest import stats
from loadtest.machine import machine_info
from loadtest.report import fmt, level_name, machine_lines, table, write_json, write_requests
from loadtest.runner import Job, Sender, jobs_for, make_sender, run_closed_loop, run_open_loop, run_sync
from loadtest.workload import WorkloadSpec, generate

DEFAULT_RATES = (50, 200, 500, 1000, 1500, 2000, 3000)
MODES = ("nonstream", "stream")
ADDED_KEYS = ("e2e_ms", "ttfb_ms", "itl_ms")
STATS = ("mean", "p50", "p90", "p99")


def interleave(direct: Sequence[Job], gateway: Sequence[Job]) -> list[Job]:
    """Pairs of the same request, direct first in even pairs and gateway first in odd ones."""
    out: list[Job] = []
    for i, (d, g) in enumerate(zip(direct, gateway, strict=True)):
        out += [d, g] if i % 2 == 0 else [g, d]
    return out


def added_latency(direct: dict[str, Any], gateway: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``gateway - direct`` of each statistic, per metric (ms); None where either side is empty."""
    out: dict[str, dict[str, float | None]] = {}
    for key in ADDED_KEYS:
        d, g = direct[key], gateway[key]
        out[key] = {s: None if d[s] is None or g[s] is None else g[s] - d[s] for s in STATS}
    return out


def judge(side: dict[str, Any], p99_target_ms: float, max_error_rate: float) -> tuple[bool, str]:
    """Whether one path sustained its level, and why not."""
    req = side["requests"]
    if req["not_sent"]:
        return False, f"{req['not_sent']} requests not sent before the time limit"
    if req["sent"] and req["failed"] / req["sent"] > max_error_rate:
        return False, f"{req['failed']} of {req['sent']} failed"
    p99 = side["e2e_ms"]["p99"]
    if p99 is None or p99 >= p99_target_ms:
        return False, f"p99 e2e {fmt(p99)} ms >= {p99_target_ms:g} ms"
    return True, "ok"


def run_overhead(
    direct_url: str,
    gateway_url: str,
    rates: Sequence[float] = DEFAULT_RATES,
    duration_s: float = 10.0,
    *,
    model: str = "base",
    gateway_model: str | None = None,
    modes: Sequence[str] = MODES,
    prompt_tokens: int = 32,
    max_tokens: int = 16,
    p99_target_ms: float = 50.0,
    max_error_rate: float = 0.001,
    timeout_s: float = 10.0,
    warmup: int = 20,
    seed: int = 0,
    stop_on_saturation: bool = True,
    api_key: str | None = None,
    client: str = "aiohttp",
    on_level: Callable[[dict[str, Any]], None] | None = None,
    keep_records: bool = False,
) -> dict[str, Any]:
    """Measure the gateway's added latency at each offered rate; returns a JSON-ready payload.

    With ``keep_records`` the payload also holds ``_records`` (per-request records by level),
    which :func:`write_overhead_report` writes to ``requests.jsonl`` and drops from the JSON.
    """
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes: choose from {MODES}, got {list(modes)}")
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"rates: must be > 0, got {list(rates)}")
    if duration_s <= 0:
        raise ValueError(f"duration_s: must be > 0, got {duration_s}")
    config = {
        "direct_url": direct_url,
        "gateway_url": gateway_url,
        "rates": list(rates),
        "duration_s": duration_s,
        "model": model,
        "gateway_model": gateway_model or model,
        "modes": list(modes),
        "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens,
        "p99_target_ms": p99_target_ms,
        "max_error_rate": max_error_rate,
        "timeout_s": timeout_s,
        "warmup": warmup,
        "seed": seed,
        "stop_on_saturation": stop_on_saturation,
        "client": client,
        "interleaving": "pairs of the same request, one per path, in alternating order",
    }
    sender = make_sender(client, api_key=api_key, timeout_s=timeout_s, max_connections=2048)
    started = dt.datetime.now(dt.UTC)
    levels, records = run_sync(_run(config, sender, on_level))
    payload: dict[str, Any] = {
        "kind": "overhead",
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": config,
        "levels": levels,
        "max_sustained_rate": {m: max_sustained(levels, m) for m in modes},
    }
    if keep_records:
        payload["_records"] = records
    return payload


def max_sustained(levels: Sequence[dict[str, Any]], mode: str) -> float | None:
    """Highest rate sustained before the first one (in rate order) that was not."""
    best = None
    for lv in sorted((lv for lv in levels if lv["mode"] == mode), key=lambda lv: lv["rate"]):
        if not lv["sustained"]:
            break
        best = lv["rate"]
    return best


async def _run(
    config: dict[str, Any], sender: Sender, on_level: Callable[[dict[str, Any]], None] | None
) -> tuple[list[dict[str, Any]], list[tuple[str, list[Any]]]]:
    levels: list[dict[str, Any]] = []
    records: list[tuple[str, list[Any]]] = []
    saturated: set[str] = set()
    timeout_s = config["timeout_s"]
    async with sender:
        for rate in config["rates"]:
            for mode in config["modes"]:
                if mode in saturated:
                    continue
                n = max(1, math.ceil(rate * config["duration_s"]))
                spec = WorkloadSpec(
                    models=[config["model"]],
                    prompt_tokens=config["prompt_tokens"],
                    max_tokens=config["max_tokens"],
                    stream=mode == "stream",
                    seed=config["seed"],
                )
                gspec = dataclasses.replace(spec, models=[config["gateway_model"]])
                if config["warmup"]:
                    warm = dataclasses.replace(spec, seed=spec.seed + 1_000_003)
                    gwarm = dataclasses.replace(gspec, seed=spec.seed + 1_000_003)
                    wjobs = interleave(
                        jobs_for(config["direct_url"], generate(warm, config["warmup"]), "direct"),
                        jobs_for(config["gateway_url"], generate(gwarm, config["warmup"]), "gateway"),
                    )
                    await run_closed_loop(sender, wjobs, 4, time_limit_s=timeout_s, drain_s=0)
                jobs = interleave(
                    jobs_for(config["direct_url"], generate(spec, n), "direct"),
                    jobs_for(config["gateway_url"], generate(gspec, n), "gateway"),
                )
                run = await run_open_loop(
                    sender,
                    jobs,
                    2 * rate,
                    seed=config["seed"],
                    time_limit_s=config["duration_s"] * 1.5 + 1.0,
                    drain_s=timeout_s,
                )
                entry = _level_entry(rate, mode, run.records, n, run.duration_s, config)
                levels.append(entry)
                records.append((f"{level_name(rate)}/{mode}", run.records))
                if on_level is not None:
                    on_level(entry)
                if not entry["sustained"] and config["stop_on_saturation"]:
                    saturated.add(mode)
            if len(saturated) == len(config["modes"]):
                break
    return levels, records


def _level_entry(
    rate: float, mode: str, recs: list[Any], n: int, duration_s: float, config: dict[str, Any]
) -> dict[str, Any]:
    groups = stats.by_tag(recs)
    side = {
        tag: stats.summarize(groups.get(tag, []), duration_s=duration_s, requested=n)
        for tag in ("direct", "gateway")
    }
    ok, why = judge(side["gateway"], config["p99_target_ms"], config["max_error_rate"])
    direct_ok, _ = judge(side["direct"], config["p99_target_ms"], config["max_error_rate"])
    lag_p99 = stats.distribution((lag for r in recs if (lag := r.send_lag) is not None), 1000.0)["p99"]
    limited_by = None
    if not ok:
        if lag_p99 is not None and lag_p99 > max(5.0, config["p99_target_ms"] / 10):
            limited_by = f"load generator (send lag p99 {lag_p99:.1f} ms)"
        elif direct_ok:
            limited_by = "gateway"
        else:
            limited_by = "upstream or machine (the direct path missed too)"
    return {
        "rate": rate,
        "mode": mode,
        "direct": side["direct"],
        "gateway": side["gateway"],
        "added_ms": added_latency(side["direct"], side["gateway"]),
        "sustained": ok,
        "reason": why,
        "limited_by": limited_by,
        "send_lag_p99_ms": lag_p99,
    }


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
    out += ["## Plots", "", "![added latency](overhead_added_latency.png)", ""]
    out += ["![p99](overhead_p99.png)", ""]
    return "\n".join(out)


def plot_overhead(payload: dict[str, Any], out_dir: Path) -> list[Path]:
    """``overhead_added_latency.png`` (added p50/p99 vs rate) and ``overhead_p99.png`` (both paths)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
