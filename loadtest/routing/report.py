"""The routing comparison's numbers side by side: per concurrency, each policy's point and the ratios
affinity / round-robin; totals over all levels; two plots (loads per 1000 requests, p99 TTFT).

Everything is derived from the ``routing`` payload alone (``summarize_routing``), so a report can be
re-rendered from ``results.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.harness.report import (
    concurrency_panel,
    machine_lines,
    pyplot,
    ratio,
    table,
    times,
    write_report,
)

POLICY_LABELS = {"affinity": "affinity", "round_robin": "round-robin"}


def _point(entry: dict[str, Any]) -> dict[str, Any]:
    s = entry["summary"]
    return {
        "completed": s["requests"]["completed"],
        "failed": s["requests"]["failed"],
        "request_throughput": s["request_throughput"],
        "output_token_throughput": s["output_token_throughput"],
        "ttft_p50_ms": s["ttft_ms"]["p50"],
        "ttft_p99_ms": s["ttft_ms"]["p99"],
        "e2e_p99_ms": s["e2e_ms"]["p99"],
        "adapter_loads": entry["adapter_loads"],
        "adapter_evictions": entry["adapter_evictions"],
        "adapter_load_errors": entry["adapter_load_errors"],
        "loads_per_1000_requests": entry["loads_per_1000_requests"],
    }


RATIO_KEYS = ("loads_per_1000_requests", "ttft_p99_ms", "ttft_p50_ms", "e2e_p99_ms", "request_throughput")


def summarize_routing(payload: dict[str, Any]) -> dict[str, Any]:
    """Per concurrency: each policy's point and affinity / round-robin for each key; totals."""
    pol = payload["policies"]
    rows = []
    for i, c in enumerate(payload["config"]["concurrency"]):
        pts = {p: _point(levels[i]) for p, levels in pol.items() if i < len(levels)}
        a, rr = pts.get("affinity"), pts.get("round_robin")
        ratios = {
            f"{k}_affinity_vs_round_robin": ratio(a and a[k], rr and rr[k]) if a and rr else None
            for k in RATIO_KEYS
        }
        rows.append({"concurrency": c, "policies": pts, "ratios": ratios})
    totals: dict[str, Any] = {}
    for p, levels in pol.items():
        done = sum(e["summary"]["requests"]["completed"] for e in levels)
        loads = sum(e["adapter_loads"] for e in levels)
        totals[p] = {
            "completed": done,
            "failed": sum(e["summary"]["requests"]["failed"] for e in levels),
            "adapter_loads": loads,
            "adapter_evictions": sum(e["adapter_evictions"] for e in levels),
            "loads_per_1000_requests": loads / done * 1000 if done else None,
        }
    a, rr = totals.get("affinity"), totals.get("round_robin")
    totals["loads_ratio_affinity_vs_round_robin"] = (
        ratio(a["adapter_loads"], rr["adapter_loads"]) if a and rr else None
    )
    return {"per_concurrency": rows, "totals": totals}


def render_routing_markdown(payload: dict[str, Any]) -> str:
    cfg, summ = payload["config"], payload["summary"]
    n = len(cfg["adapters"])
    names = [Path(a).name for a in cfg["adapters"]]
    present = [p for p in POLICY_LABELS if p in payload["policies"]]
    slots = cfg["replicas"] * cfg["resident"]
    out = [
        "# Routing: adapter affinity vs round-robin",
        "",
        f"- Base `{cfg['base']}` (served as `{cfg['base_name'] or Path(cfg['base']).name}`); {n} adapters "
        f"({', '.join(names[:4])}{', ...' if n > 4 else ''}) under `{cfg['mix']}`",
        f"- {cfg['replicas']} vLLM replicas with --enable-lora (max_loras = max_cpu_loras = "
        f"{cfg['resident']}); one gateway at a time attached to all of them with `registry.max_resident: "
        f"{cfg['resident']}` ({slots} adapter slots in all for {n} adapters) and `routing: affinity` or "
        "`round_robin`; every adapter unloaded from every replica before each gateway starts",
        f"- Closed loop, concurrency {', '.join(str(c) for c in cfg['concurrency'])}; the same "
        f"{cfg['requests']} streaming requests (seed {cfg['seed']}) per level and policy, prompt "
        f"~{cfg['prompt_tokens']} tokens, max_tokens {cfg['max_tokens']}"
        f"{' (ignore_eos)' if cfg['ignore_eos'] else ''}; the two policies back to back at each level",
        f"- Started {payload['started_at']}, finished {payload['finished_at']}; load average at the start "
        f"{payload.get('load_average_before')}",
        *machine_lines(payload["machine"]),
        "",
        "## Loads per 1000 requests, p99 TTFT, throughput",
        "",
    ]
    head = ["concurrency", "policy", "req/s", "TTFT p50 (ms)", "TTFT p99 (ms)", "E2E p99 (ms)", "failed"]
    head += ["loads", "evictions", "load errors", "loads per 1000 requests"]
    rows = []
    for row in summ["per_concurrency"]:
        for p in present:
            q = row["policies"].get(p)
            if q is None:
                continue
            rows.append(
                [row["concurrency"], POLICY_LABELS[p], q["request_throughput"], q["ttft_p50_ms"]]
                + [q["ttft_p99_ms"], q["e2e_p99_ms"], q["failed"], q["adapter_loads"]]
                + [q["adapter_evictions"], q["adapter_load_errors"], q["loads_per_1000_requests"]]
            )
    out += [table(head, rows), ""]
    out += ["## Affinity / round-robin", ""]
    head = ["concurrency", "loads per 1000 requests", "TTFT p99", "TTFT p50", "E2E p99", "req/s"]
    rows = [
        [row["concurrency"]] + [times(row["ratios"][f"{k}_affinity_vs_round_robin"]) for k in RATIO_KEYS]
        for row in summ["per_concurrency"]
    ]
    out += [table(head, rows), ""]
    t = summ["totals"]
    out += ["## All levels together", ""]
    rows = [
        [POLICY_LABELS[p], t[p]["completed"], t[p]["failed"], t[p]["adapter_loads"]]
        + [t[p]["adapter_evictions"], t[p]["loads_per_1000_requests"]]
        for p in present
    ]
    head = ["policy", "completed", "failed", "loads", "evictions", "loads per 1000 requests"]
    out += [table(head, rows), ""]
    out += [f"Loads, affinity / round-robin: {times(t['loads_ratio_affinity_vs_round_robin'])}", ""]
    out += [
        "## Plots",
        "",
        "![loads per 1000 requests](routing_loads.png)",
        "",
        "![ttft p99](routing_ttft_p99.png)",
        "",
    ]
    return "\n".join(out)


def plot_routing(payload: dict[str, Any], out_dir: Path) -> list[Path]:
    """``routing_loads.png`` and ``routing_ttft_p99.png`` vs concurrency, one line per policy."""
    plt = pyplot()
    rows = payload["summary"]["per_concurrency"]
    labels = {p: label for p, label in POLICY_LABELS.items() if p in payload["policies"]}
    styles = dict(zip(POLICY_LABELS, ("o-", "s--"), strict=True))
    paths = []
    for key, title, name in (
        ("loads_per_1000_requests", "Adapter loads per 1000 requests vs concurrency", "routing_loads.png"),
        ("ttft_p99_ms", "p99 TTFT (ms) vs concurrency", "routing_ttft_p99.png"),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        concurrency_panel(ax, rows, "policies", labels, styles, key, title)
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_routing_report(out_dir: Path, payload: dict[str, Any]) -> dict[str, Path]:
    return write_report(out_dir, payload, render_routing_markdown, plot_routing)
