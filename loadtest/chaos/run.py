"""``loadtest chaos``: clients keep sending while vLLM (or one of two replicas) is killed with SIGKILL once.

    lora-gateway loadtest chaos --clients 24 --duration 60 --replicas 1 --out out/chaos-1
    lora-gateway loadtest chaos --clients 24 --duration 60 --replicas 2 --out out/chaos-2

A managed gateway (``lora-gateway serve``, spawning its vLLM replicas) serves the embedded tiny model and
the demo adapters. Each model's greedy answer to every request of the plan is learned first, one request
at a time. Then ``clients`` clients (``clients.py``) run; at ``kill_at`` seconds the busiest engine's
process group (its pid from ``/admin/engines``) gets SIGKILL. The clients keep going for at least
``duration`` seconds and until the killed engine has been ready again for ``settle_s`` (at most
``restart_timeout_s`` after the kill). Then the gateway's resident set of each engine is compared with
that engine's own ``/v1/models`` (drift), and results.json, report.md and chaos.png are written.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtest.chaos.clients import chaos_plan, learn_references, run_clients, summarize
from loadtest.chaos.report import per_second
from loadtest.harness.machine import machine_info
from loadtest.harness.verify import References

Log = Callable[[str], None]
COLUMNS = ("start", "end", "kind", "status", "code", "stream", "started", "client", "model")


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    out: Path
    clients: int = 24
    duration_s: float = 60.0
    replicas: int = 1
    kill_at_s: float = 15.0
    max_tokens: int = 8
    settle_s: float = 10.0
    restart_timeout_s: float = 600.0
    workdir: Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.replicas not in (1, 2):
            raise ValueError(f"replicas: 1 or 2, got {self.replicas}")
        if self.clients < 1:
            raise ValueError(f"clients: must be >= 1, got {self.clients}")
        if not 0 < self.kill_at_s < self.duration_s:
            raise ValueError(f"kill_at: must be inside (0, duration), got {self.kill_at_s}")


def engines(url: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = httpx.get(url + "/admin/engines", timeout=10, trust_env=False).json()["data"]
    return data


def kill_group(pid: int) -> int:
    """SIGKILL the process group led by ``pid`` (a vLLM the gateway started in a session of its own)."""
    pgid = os.getpgid(pid)
    if pgid != pid or pgid == os.getpgid(0):
        raise RuntimeError(f"pid {pid} does not lead a process group of its own (group {pgid})")
    os.killpg(pgid, signal.SIGKILL)
    return pgid


def listed(vllm_url: str, headers: dict[str, str] | None = None) -> set[str]:
    """The adapters vLLM itself lists on ``/v1/models`` (``headers``: its key, if it has one)."""
    r = httpx.get(vllm_url + "/v1/models", headers=headers, timeout=10, trust_env=False)
    r.raise_for_status()
    return {m["id"] for m in r.json()["data"] if m.get("parent")}


def drift(url: str, timeout_s: float = 20.0, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Per engine: adapters the gateway holds resident vs those vLLM lists. A listing read before and after
    the gateway's view, and equal to it, is agreement; differing until ``timeout_s`` is drift (the sizes
    of the symmetric difference, summed in ``total``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out: dict[str, Any] = {"engines": {}, "total": 0}
        for e in engines(url):
            before = listed(e["url"], headers)
            [view] = [x for x in engines(url) if x["name"] == e["name"]]
            after = listed(e["url"], headers)
            mine = set(view["resident_adapters"])
            diff = len(mine ^ after) if before == after else len(mine ^ after) or 1
            out["engines"][e["name"]] = {"gateway": sorted(mine), "vllm": sorted(after), "drift": diff}
            out["total"] += diff
        if out["total"] == 0 or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def gateway_settings(cfg: ChaosConfig, cache_dir: Path, engine_key: str) -> dict[str, Any]:
    """The managed gateway's configuration; vLLM gets ``engine_key`` where the gateway has
    ``engine.api_key`` (then vLLM's /v1 routes need it, drift's reading of them too)."""
    from gateway.settings import EngineSettings
    from loadtest.servers.serving import free_port

    engine: dict[str, Any] = {
        "replicas": cfg.replicas,
        "port": free_port(),
        "max_loras": 2,
        "max_cpu_loras": 4,
        "health_interval_s": 0.5,
    }
    if "api_key" in EngineSettings.model_fields:
        engine["api_key"] = engine_key
    return {"cache_dir": str(cache_dir), "engine": engine}


def wait_all_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(e["state"] == "ready" for e in engines(url)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"engines not ready: {engines(url)}")
        time.sleep(0.5)


async def chaos_phase(cfg: ChaosConfig, url: str, plan: Any, refs: References, log: Log) -> dict[str, Any]:
    """The clients, the kill, the wait for the killed engine, the engine timeline sampled each 0.5 s."""
    t0 = time.monotonic()
    now = lambda: time.monotonic() - t0  # noqa: E731
    state: dict[str, Any] = {"kill_at": None, "victim": None, "back_at": None, "timeline": []}
    outcomes: list[Any] = []

    def stop() -> bool:
        t = now()
        if t < cfg.duration_s:
            return False
        if state["kill_at"] is not None and t > state["kill_at"] + cfg.restart_timeout_s:
            return True
        return state["back_at"] is not None and t >= state["back_at"] + cfg.settle_s

    async def watch(http: httpx.AsyncClient) -> None:
        while not stop():
            t = now()
            try:
                data = (await http.get(url + "/admin/engines")).json()["data"]
            except httpx.HTTPError:
                data = []
            state["timeline"].append({"t": round(t, 2), "engines": {e["name"]: e["state"] for e in data}})
            if state["kill_at"] is None and t >= cfg.kill_at_s and data:
                victim = max(data, key=lambda e: e["active_requests"])
                kill_group(victim["pid"])
                state["kill_at"], state["victim"] = now(), {"name": victim["name"], "pid": victim["pid"]}
                log(f"t={state['kill_at']:.1f} s: SIGKILL to {victim['name']} (pid {victim['pid']})")
            elif state["kill_at"] is not None and state["back_at"] is None:
                v = next((e for e in data if e["name"] == state["victim"]["name"]), None)
                new_pid = v is not None and v["pid"] not in (None, state["victim"]["pid"])
                if v is not None and new_pid and v["state"] == "ready":
                    state["back_at"] = t
                    log(f"t={t:.1f} s: {v['name']} ready again (pid {v['pid']})")
            await asyncio.sleep(0.5)

    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        await asyncio.gather(
            run_clients(
                url, plan, refs, clients=cfg.clients, stop=stop, t0=t0, seed=cfg.seed, outcomes=outcomes
            ),
            watch(http),
        )
    state["ended_at"] = now()
    return {**state, "outcomes": outcomes}


def run_chaos(cfg: ChaosConfig, log: Log = print) -> dict[str, Any]:
    import secrets
    import tempfile

    from adapters.demo import build_demo_adapters
    from adapters.tiny import TINY_NAME, build_tiny
    from gateway.settings import Settings
    from loadtest.chaos.report import write_report
    from loadtest.servers.processes import gateway_process

    cache_dir = Settings().cache_dir
    base = build_tiny(cache_dir)
    demos = build_demo_adapters(cache_dir, base, TINY_NAME)
    work = cfg.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    started = dt.datetime.now(dt.UTC)
    key = secrets.token_urlsafe(16)
    log(f"starting a managed gateway with {cfg.replicas} vLLM replica(s) (minutes on a CPU)")
    with gateway_process(gateway_settings(cfg, cache_dir, key), work, timeout_s=cfg.restart_timeout_s) as gw:
        wait_all_ready(gw.url, cfg.restart_timeout_s)
        models = [TINY_NAME, *sorted(demos)]
        plan = chaos_plan(models, max_tokens=cfg.max_tokens)
        refs = References()

        async def learn() -> None:
            async with httpx.AsyncClient(timeout=300, trust_env=False) as http:
                await learn_references(http, gw.url, plan, refs)

        asyncio.run(learn())
        log(f"learned {len(refs)} references of {models}; {cfg.clients} clients for >= {cfg.duration_s:g} s")
        phase = asyncio.run(chaos_phase(cfg, gw.url, plan, refs, log))
        wait_all_ready(gw.url, cfg.restart_timeout_s)
        time.sleep(2)  # the next probes replace the gateway's view with vLLM's own list
        drifted = drift(gw.url, headers={"authorization": f"Bearer {key}"})
        final_engines = engines(gw.url)
    outcomes = phase.pop("outcomes")
    summary = summarize(outcomes, phase["kill_at"])
    if phase["kill_at"] is not None and phase["back_at"] is not None:
        summary["seconds_until_killed_engine_ready"] = round(phase["back_at"] - phase["kill_at"], 2)
    summary["drift"] = drifted["total"]
    payload = {
        "scenario": "chaos",
        "started": started.isoformat(timespec="seconds"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "models": models,
        "machine": machine_info(),
        "summary": summary,
        "drift": drifted,
        "kill": {k: phase[k] for k in ("kill_at", "victim", "back_at", "ended_at")},
        "engines_after": [{k: e.get(k) for k in ("name", "state", "restarts", "pid")} for e in final_engines],
        "timeline": phase["timeline"],
        "per_second": per_second([o.to_dict() for o in outcomes]),
        "outcome_columns": list(COLUMNS),  # the requests not answered right, one row each, in this order
        "outcomes": [[o.to_dict()[c] for c in COLUMNS] for o in outcomes if o.kind != "right"],
    }
    write_report(cfg.out, payload)
    return payload
