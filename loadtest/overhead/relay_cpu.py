"""Gateway CPU per relayed SSE chunk and added inter-token latency, with streams paced like an engine's.

    lora-gateway loadtest overhead --relay-cpu --streams 16,64,128,256 --out out/relay-cpu
    python -m loadtest.overhead.relay_cpu --streams 64 --chunks 200 --itl-ms 10 --duration 15 --rounds 3 \\
        --workers 1,2 --out out/relay-cpu

Starts the paced fast upstream and one gateway per relay (`stream_relay`: `socket`, the protocol-level
relay; `asgi`, aiohttp and ASGI messages), each in its own process, and runs the same closed-loop load
(``--streams`` concurrent streaming completions of ``--chunks`` chunks, ``--itl-ms`` apart) directly and
through each gateway, interleaved, ``--rounds`` times. A process's CPU seconds come from /proc (user and
system, its children included) over the load's wall time; divided by the SSE events the client received.
An upstream that sent all chunks at once would hide the relay's cost (one read, one write per chunk).

Inter-token latency is what the client sees between two events of one stream (p50, p99 over every gap);
"added" is a gateway's p99 minus the direct path's in the same round and at the same concurrency. With
``--workers 1,2`` the socket relay also runs as ``serve --workers 2`` (CPU: every worker's). The chunks per
second one gateway relays with added ITL p99 under 1 ms is the highest such level's event rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from loadtest.overhead.suite import attached_gateway_settings, fast_upstream
from loadtest.servers.processes import gateway_process


def _cpu(pid: int) -> tuple[float, float]:
    root = psutil.Process(pid)
    user = system = 0.0
    for p in (root, *root.children(recursive=True)):
        t = p.cpu_times()
        user += t.user
        system += t.system
    return user, system


async def _load(url: str, streams: int, chunks: int, duration_s: float) -> dict[str, Any]:
    body = json.dumps({"model": "base", "prompt": "hi", "max_tokens": chunks, "stream": True}).encode()
    stop = time.monotonic() + duration_s
    counts = {"events": 0, "requests": 0, "failed": 0}
    gaps: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            while time.monotonic() < stop:
                headers = {"content-type": "application/json"}
                async with session.post(url + "/v1/completions", data=body, headers=headers) as r:
                    if r.status != 200:
                        counts["failed"] += 1
                        await r.read()
                        continue
                    last = None
                    async for chunk in r.content.iter_any():
                        n = chunk.count(b"\n\n")
                        now = time.perf_counter()
                        if last is not None and n:
                            gaps.append(now - last)  # events read together: one gap, then none
                        last = now
                        counts["events"] += n
                counts["requests"] += 1

        await asyncio.gather(*(one() for _ in range(streams)))
    return {**counts, "gaps": gaps}


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(url: str, pid: int, streams: int, chunks: int, duration_s: float) -> dict[str, Any]:
    u0, s0 = _cpu(pid)
    t0 = time.monotonic()
    counts = asyncio.run(_load(url, streams, chunks, duration_s))
    wall = time.monotonic() - t0
    u1, s1 = _cpu(pid)
    gaps = counts.pop("gaps")
    events = max(counts["events"], 1)
    p50, p99 = _quantile(gaps, 0.5), _quantile(gaps, 0.99)
    return {
        **counts,
        "wall_s": round(wall, 2),
        "events_per_s": round(counts["events"] / wall),
        "cpu_user_s": round(u1 - u0, 3),
        "cpu_system_s": round(s1 - s0, 3),
        "cpu_us_per_event": round((u1 - u0 + s1 - s0) / events * 1e6, 2),
        "cpu_us_per_request": round((u1 - u0 + s1 - s0) / max(counts["requests"], 1) * 1e6, 1),
        "itl_p50_ms": None if p50 is None else round(p50 * 1e3, 3),
        "itl_p99_ms": None if p99 is None else round(p99 * 1e3, 3),
    }


def add_itl_deltas(rows: list[dict[str, Any]]) -> None:
    """Each gateway row's `added_itl_p99_ms`: its p99 minus direct's, same round and concurrency."""
    direct = {(r["round"], r["streams"]): r for r in rows if r["path"] == "direct"}
    for r in rows:
        d = direct.get((r["round"], r["streams"]))
        if r["path"] != "direct" and d and r["itl_p99_ms"] is not None and d["itl_p99_ms"] is not None:
            r["added_itl_p99_ms"] = round(r["itl_p99_ms"] - d["itl_p99_ms"], 3)


def summarize(rows: list[dict[str, Any]], itl_budget_ms: float = 1.0) -> dict[str, Any]:
    """Per path and concurrency, medians over rounds; per path, the highest event rate whose median added
    ITL p99 stayed under `itl_budget_ms`."""
    out: dict[str, Any] = {"levels": {}, "within_itl_budget": {}}
    for path in dict.fromkeys(r["path"] for r in rows):
        for streams in sorted({r["streams"] for r in rows}):
            mine = [r for r in rows if r["path"] == path and r["streams"] == streams]
            if not mine:
                continue
            level = {
                k: statistics.median(r[k] for r in mine)
                for k in ("cpu_us_per_event", "events_per_s", "itl_p99_ms", "added_itl_p99_ms")
                if all(r.get(k) is not None for r in mine)
            }
            out["levels"].setdefault(path, {})[streams] = level
            added = level.get("added_itl_p99_ms")
            if added is not None and added < itl_budget_ms:
                best = out["within_itl_budget"].get(path)
                if best is None or level["events_per_s"] > best["events_per_s"]:
                    out["within_itl_budget"][path] = {"streams": streams, **level}
    return out


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = payload["summary"]["levels"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, by_streams in levels.items():
        xs = sorted(by_streams, key=int)
        if name != "direct":
            ax1.plot([int(x) for x in xs], [by_streams[x]["cpu_us_per_event"] for x in xs], "o-", label=name)
            ys = [by_streams[x].get("added_itl_p99_ms") for x in xs]
            ax2.plot([int(x) for x in xs], ys, "o-", label=name)
    ax1.set(xlabel="concurrent streams", ylabel="gateway CPU per chunk (µs)", title="Relay CPU per chunk")
    ax2.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax2.set(xlabel="concurrent streams", ylabel="added ITL p99 (ms)", title="Added inter-token latency p99")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    m = payload["machine"]
    fig.suptitle(
        f"paced upstream, {payload['chunks']} chunks {payload['itl_ms']:g} ms apart; {m['cpus']} CPUs",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    out: Path,
    *,
    streams: list[int],
    chunks: int = 200,
    itl_ms: float = 10.0,
    duration_s: float = 15.0,
    rounds: int = 3,
    relays: list[str] | None = None,
    workers: list[int] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Start the servers, run every (round, concurrency, path) interleaved, write results.json + plot."""
    relays = relays or ["socket", "asgi"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lora-gateway-relay-cpu-") as tmp:
        work = Path(tmp)
        with fast_upstream(work, itl_ms=itl_ms) as up, contextlib.ExitStack() as stack:
            paths = {"direct": (up.url, up.pid)}
            for relay in relays:
                settings = {**attached_gateway_settings(up.url, "base", work / relay), "stream_relay": relay}
                gw = stack.enter_context(gateway_process(settings, work / relay, name=f"gateway-{relay}"))
                paths[relay] = (gw.url, gw.pid)
            for n in workers or []:
                if n > 1:
                    name = f"socket-{n}-workers"
                    settings = {**attached_gateway_settings(up.url, "base", work / name), "workers": n}
                    gw = stack.enter_context(gateway_process(settings, work / name, name=name))
                    paths[name] = (gw.url, gw.pid)
            total = rounds * len(streams) * len(paths)
            for rnd in range(rounds):
                for level in streams:
                    for path, (url, pid) in paths.items():
                        row = {"round": rnd, "streams": level, "path": path}
                        row |= measure(url, pid, level, chunks, duration_s)
                        rows.append(row)
                        log(f"[{len(rows)}/{total}] {json.dumps(row)}")
    add_itl_deltas(rows)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform()},
        "streams": streams,
        "chunks": chunks,
        "itl_ms": itl_ms,
        "duration_s": duration_s,
        "rows": rows,
        "summary": summarize(rows),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    plot(payload, out / "relay_cpu.png")
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="64", help="concurrency levels, comma-separated")
    p.add_argument("--chunks", type=int, default=200)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--relays", default="socket,asgi")
    p.add_argument("--workers", default="1", help="also serve --workers N for each N > 1 (socket relay)")
    p.add_argument("--out", type=Path, default=Path("out/relay-cpu"))
    a = p.parse_args(argv)
    payload = run(
        a.out,
        streams=[int(x) for x in a.streams.split(",") if x.strip()],
        chunks=a.chunks,
        itl_ms=a.itl_ms,
        duration_s=a.duration,
        rounds=a.rounds,
        relays=[r.strip() for r in a.relays.split(",") if r.strip()],
        workers=[int(x) for x in a.workers.split(",") if x.strip()],
    )
    print(json.dumps(payload["summary"], indent=2))
    print(f"wrote {a.out / 'results.json'} and {a.out / 'relay_cpu.png'}")


if __name__ == "__main__":
    main()
