"""What the tenants' side costs the gateway per request: its CPU with the access log, an API key, per-key
limits counted here, and limits counted in Redis, each against a gateway with none of them, in one run.

    python -m loadtest.overhead.tenancy_cpu --concurrency 16 --duration 10 --rounds 3 --out out/tenancy-cpu

Starts the fast upstream (non-streamed answers) and one gateway per configuration, each in its own process,
and a `redis-server` on loopback for the Redis one; then runs the same closed-loop load (`--concurrency`
clients sending non-streamed completions back to back) through each, interleaved, `--rounds` times. A
gateway's CPU seconds come from /proc over the load's wall time, divided by the requests answered; "added"
is a configuration's µs per request minus the baseline's in the same round. Every answer must be a 200 (the
limits are set far above what the load reaches): a configuration that refused requests would look cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

from loadtest.overhead.relay_cpu import _cpu
from loadtest.overhead.suite import attached_gateway_settings, fast_upstream
from loadtest.servers.processes import gateway_process
from loadtest.servers.serving import free_port

HIGH = 10**9  # limits no load here reaches
CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": {"access_log": False},
    "access-log": {"access_log": True},
    "key": {"access_log": False, "key": {}},
    "key+limits": {"access_log": False, "key": {"requests_per_minute": HIGH, "tokens_per_minute": HIGH}},
    "key+limits+concurrency": {
        "access_log": False,
        "key": {"requests_per_minute": HIGH, "tokens_per_minute": HIGH, "max_concurrent": 100000},
    },
    "key+redis-limits": {
        "access_log": False,
        "key": {"requests_per_minute": HIGH, "tokens_per_minute": HIGH},
        "redis": True,
    },
    "everything": {
        "access_log": True,
        "key": {"requests_per_minute": HIGH, "tokens_per_minute": HIGH, "max_concurrent": 100000},
        "redis": True,
    },
}


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir), "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _load(url: str, key: str | None, concurrency: int, duration_s: float) -> dict[str, int]:
    body = json.dumps({"model": "base", "prompt": "hi", "max_tokens": 8}).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    stop = time.monotonic() + duration_s
    counts = {"requests": 0, "failed": 0}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            while time.monotonic() < stop:
                async with session.post(url + "/v1/completions", data=body, headers=headers) as r:
                    await r.read()
                    counts["requests" if r.status == 200 else "failed"] += 1

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return counts


def measure(url: str, pid: int, key: str | None, concurrency: int, duration_s: float) -> dict[str, Any]:
    u0, s0 = _cpu(pid)
    t0 = time.monotonic()
    counts = asyncio.run(_load(url, key, concurrency, duration_s))
    wall = time.monotonic() - t0
    u1, s1 = _cpu(pid)
    cpu = u1 - u0 + s1 - s0
    return {
        **counts,
        "wall_s": round(wall, 2),
        "requests_per_s": round(counts["requests"] / wall),
        "cpu_us_per_request": round(cpu / max(counts["requests"], 1) * 1e6, 1),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_round = {(r["round"], r["config"]): r for r in rows}
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        added = [
            r["cpu_us_per_request"] - by_round[(r["round"], "baseline")]["cpu_us_per_request"]
            for r in rows
            if r["config"] == name
        ]
        own = [r["cpu_us_per_request"] for r in rows if r["config"] == name]
        out[name] = {
            "cpu_us_per_request": statistics.median(own),
            "added_us_median": statistics.median(added),
        }
    return out


def run(
    out: Path,
    *,
    concurrency: int,
    duration_s: float,
    rounds: int,
    configs: list[str] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    chosen = {name: CONFIGS[name] for name in ["baseline", *(configs or CONFIGS)] if name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="lora-gateway-tenancy-cpu-") as tmp:
        work = Path(tmp)
        with fast_upstream(work) as up, redis_server(work) as redis, contextlib.ExitStack() as stack:
            paths: dict[str, tuple[str, int, str | None]] = {}
            for name, cfg in chosen.items():
                settings: dict[str, Any] = {
                    **attached_gateway_settings(up.url, "base", work / name),
                    "access_log": cfg["access_log"],
                }
                if cfg.get("redis"):
                    settings["limits"] = {"redis_url": redis, "redis_prefix": f"{name}:"}
                gw = stack.enter_context(gateway_process(settings, work / name, name=name))
                key = None
                if "key" in cfg:
                    body = {"name": "bench", "limits": cfg["key"]} if cfg["key"] else {"name": "bench"}
                    r = httpx.post(gw.url + "/admin/keys", json=body, timeout=10)
                    r.raise_for_status()
                    key = r.json()["key"]
                paths[name] = (gw.url, gw.pid, key)
            total = rounds * len(paths)
            for rnd in range(rounds):
                for name, (url, pid, key) in paths.items():
                    row = {"round": rnd, "config": name, **measure(url, pid, key, concurrency, duration_s)}
                    rows.append(row)
                    log(f"[{len(rows)}/{total}] {json.dumps(row)}")
                    if row["failed"]:
                        raise SystemExit(f"{name}: {row['failed']} requests failed: the comparison would lie")
    payload = {
        "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform()},
        "concurrency": concurrency,
        "duration_s": duration_s,
        "rows": rows,
        "summary": summarize(rows),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    plot(payload, out / "tenancy_cpu.png")
    return payload


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = payload["summary"]
    names = list(summary)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(names, [summary[n]["cpu_us_per_request"] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(summary[n]["cpu_us_per_request"], i, f" +{summary[n]['added_us_median']:.0f}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("gateway CPU per request (µs, median of rounds); + = over baseline")
    ax.set_title(
        f"Tenancy cost per request, {payload['concurrency']} clients ({payload['machine']['cpus']} CPUs)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS), help="which configurations (baseline always)")
    p.add_argument("--out", type=Path, default=Path("out/tenancy-cpu"))
    a = p.parse_args(argv)
    configs = [c for c in a.configs.split(",") if c.strip()]
    payload = run(a.out, concurrency=a.concurrency, duration_s=a.duration, rounds=a.rounds, configs=configs)
    print(json.dumps(payload["summary"], indent=2))


if __name__ == "__main__":
    main()
