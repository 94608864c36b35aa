"""Gateway CPU per relayed SSE chunk, with streams paced the way an engine paces them.

    python -m loadtest.overhead.relay_cpu --streams 64 --chunks 200 --itl-ms 10 --duration 15 --rounds 3 \\
        --out out/relay-cpu

Starts the paced fast upstream and one gateway per relay (`stream_relay`: `socket`, the protocol-level
relay; `asgi`, aiohttp and ASGI messages), each in its own process, and runs the same closed-loop load
(``--streams`` concurrent streaming completions of ``--chunks`` chunks, ``--itl-ms`` apart) directly and
through each gateway, interleaved, ``--rounds`` times. A process's CPU seconds come from /proc (user and
system, its children included) over the load's wall time; divided by the SSE events the client received.
An upstream that sent all chunks at once would hide the relay's cost (one read, one write per chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
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


async def _load(url: str, streams: int, chunks: int, duration_s: float) -> dict[str, int]:
    body = json.dumps({"model": "base", "prompt": "hi", "max_tokens": chunks, "stream": True}).encode()
    stop = time.monotonic() + duration_s
    counts = {"events": 0, "requests": 0, "failed": 0}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            while time.monotonic() < stop:
                headers = {"content-type": "application/json"}
                async with session.post(url + "/v1/completions", data=body, headers=headers) as r:
                    if r.status != 200:
                        counts["failed"] += 1
                        await r.read()
                        continue
                    async for chunk in r.content.iter_any():
                        counts["events"] += chunk.count(b"\n\n")
                counts["requests"] += 1

        await asyncio.gather(*(one() for _ in range(streams)))
    return counts


def measure(url: str, pid: int, streams: int, chunks: int, duration_s: float) -> dict[str, Any]:
    u0, s0 = _cpu(pid)
    t0 = time.monotonic()
    counts = asyncio.run(_load(url, streams, chunks, duration_s))
    wall = time.monotonic() - t0
    u1, s1 = _cpu(pid)
    events = max(counts["events"], 1)
    return {
        **counts,
        "wall_s": round(wall, 2),
        "cpu_user_s": round(u1 - u0, 3),
        "cpu_system_s": round(s1 - s0, 3),
        "cpu_us_per_event": round((u1 - u0 + s1 - s0) / events * 1e6, 2),
        "cpu_us_per_request": round((u1 - u0 + s1 - s0) / max(counts["requests"], 1) * 1e6, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--chunks", type=int, default=200)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--relays", default="socket,asgi")
    p.add_argument("--out", type=Path, default=Path("out/relay-cpu"))
    a = p.parse_args(argv)
    relays = [r.strip() for r in a.relays.split(",") if r.strip()]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lora-gateway-relay-cpu-") as tmp:
        work = Path(tmp)
        with fast_upstream(work, itl_ms=a.itl_ms) as up, contextlib.ExitStack() as stack:
            paths = {"direct": (up.url, up.pid)}
            for relay in relays:
                settings = {**attached_gateway_settings(up.url, "base", work / relay), "stream_relay": relay}
                gw = stack.enter_context(gateway_process(settings, work / relay, name=f"gateway-{relay}"))
                paths[relay] = (gw.url, gw.pid)
            for rnd in range(a.rounds):
                for path, (url, pid) in paths.items():
                    row = {"round": rnd, "path": path}
                    row |= measure(url, pid, a.streams, a.chunks, a.duration)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform()},
        "streams": a.streams,
        "chunks": a.chunks,
        "itl_ms": a.itl_ms,
        "duration_s": a.duration,
        "rows": rows,
    }
    (a.out / "results.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {a.out / 'results.json'}")


if __name__ == "__main__":
    main()
