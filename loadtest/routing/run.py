"""``loadtest routing``: adapter-affinity routing vs round-robin over the same vLLM replicas.

    lora-gateway loadtest routing --replicas 2 --random-adapters 8 --resident 2 --mix zipf:1.1 \\
        --concurrency 1,4,8 --requests 200 --out out/routing

``replicas`` vLLM servers with ``--enable-lora`` start together (their slow CPU starts overlap) and
stay up. At each concurrency level the two policies run back to back (their order alternating
between levels), each through a fresh gateway attached to all the replicas (``engine.urls``) with
``routing: affinity`` or ``routing: round_robin`` and ``registry.max_resident`` = ``resident``
adapter slots per replica. Before each gateway starts, every adapter is unloaded from every replica,
so each (policy, level) starts from empty replicas and sends the same request sequence (same seed:
the same adapters in the same order; closed loop, streaming, ``ignore_eos``). With more adapters than
the replicas' slots, the difference between the policies is where adapters get loaded: affinity keeps
an adapter on the replica that has it, round-robin sends it to every replica in turn. Adapter loads
and evictions come from the gateway's ``/metrics`` around each level.

    from loadtest.routing.run import RoutingConfig, run_routing
    payload = run_routing(RoutingConfig(base=Path("..."), adapters=[...], out=Path("out/routing")))
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtest.compare.run import (
    EVICTIONS,
    LOAD_ERRORS,
    LOADS,
    fmt_ms,
    max_lora_rank,
    served_models,
    unload_all,
    workdir,
)
from loadtest.harness.machine import load_average, machine_info
from loadtest.harness.sweep import SweepConfig, run_sweep
from loadtest.harness.verify import References
from loadtest.harness.workload import WorkloadSpec
from loadtest.servers.processes import (
    LoraOptions,
    Server,
    gateway_process,
    scrape_counters,
    tree_memory,
    vllm_process,
)

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]  # (label, done, total)
POLICIES = ("affinity", "round_robin")


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """One comparison. Adapter names are their folder names."""

    base: Path
    adapters: Sequence[Path]
    out: Path
    base_name: str | None = None
    replicas: int = 2
    resident: int = 2
    mix: str = "zipf:1.1"
    concurrency: Sequence[int] = (1, 4, 8)
    requests: int = 200
    prompt_tokens: int = 64
    max_tokens: int = 32
    ignore_eos: bool = True
    timeout_s: float = 300.0
    time_limit_s: float = 900.0
    client: str = "aiohttp"
    seed: int = 0
    vllm_args: Sequence[str] = ()
    workdir: Path | None = None
    snapshot_base: bool = False
    verify: bool = False

    def __post_init__(self) -> None:
        names = self.names
        if len(set(names)) != len(names):
            raise ValueError(f"adapters: folder names must differ, got {names}")
        if self.replicas < 2:
            raise ValueError(f"replicas: routing needs at least 2, got {self.replicas}")
        if self.resident < 1:
            raise ValueError(f"resident: must be >= 1, got {self.resident}")
        if len(names) <= self.resident:
            raise ValueError(
                f"adapters: give more than --resident ({self.resident}) so that adapters must move, "
                f"got {len(names)}"
            )
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency: must be >= 1, got {list(self.concurrency)}")
        WorkloadSpec(models=names, mix=self.mix)  # validates the mix

    @property
    def names(self) -> list[str]:
        return [Path(a).name for a in self.adapters]

    @property
    def served_base(self) -> str:
        return self.base_name or Path(self.base).name

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("base", "out", "workdir"):
            d[k] = None if d[k] is None else str(d[k])
        d["adapters"] = [str(a) for a in self.adapters]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def workload(cfg: RoutingConfig, models: Sequence[str], seed: int | None = None) -> WorkloadSpec:
    return WorkloadSpec(
        models=list(models),
        mix=cfg.mix if len(models) > 1 else "uniform",
        prompt_tokens=cfg.prompt_tokens,
        max_tokens=cfg.max_tokens,
        stream=True,
        seed=cfg.seed if seed is None else seed,
        ignore_eos=cfg.ignore_eos,
        extra_body={"return_token_ids": True},  # a chunk per token: TTFT per token, not per character
    )


def sweep(
    cfg: RoutingConfig,
    url: str,
    spec: WorkloadSpec,
    level: int,
    requests: int,
    on_done: Callable[[int], None] | None = None,
    references: References | None = None,
) -> dict[str, Any]:
    """One closed-loop level; ``on_done(n)`` after each finished request. With ``references`` (and
    ``cfg.verify``) every answer is checked; both policies send the same requests to the same replicas, so
    one set of references serves the whole run."""
    sc = SweepConfig(
        target=url,
        workload=spec,
        mode="concurrency",
        levels=[level],
        requests=requests,
        timeout_s=cfg.timeout_s,
        time_limit_s=cfg.time_limit_s,
        client=cfg.client,
        verify=cfg.verify and references is not None,
    )
    done = [0]

    def tick(_: Any) -> None:
        done[0] += 1
        if on_done is not None:
            on_done(done[0])

    return run_sweep(sc, on_result=tick, references=references).payload["levels"][0]


def warm_replica(cfg: RoutingConfig, vllm: Server, adapter: Path) -> None:
    """Unmeasured: a few base-model requests, then one adapter loaded, used and unloaded directly on
    vLLM (the first requests of a vLLM, and its first LoRA step, are slow)."""
    sweep(cfg, vllm.url, workload(cfg, [cfg.served_base], seed=cfg.seed + 99), 1, 3)
    name = "warm-" + adapter.name
    with httpx.Client(base_url=vllm.url, timeout=120, trust_env=False) as c:
        body = {"lora_name": name, "lora_path": str(adapter)}
        c.post("/v1/load_lora_adapter", json=body).raise_for_status()
    sweep(cfg, vllm.url, workload(cfg, [name], seed=cfg.seed + 98), 1, 2)
    unload_all(vllm.url)


def gateway_settings(
    cfg: RoutingConfig, replicas: Sequence[Server], adapters_dir: Path, policy: str
) -> dict[str, Any]:
    engine = {
        "mode": "attached",
        "urls": [r.url for r in replicas],
        "model": str(Path(cfg.base).absolute()),
        "served_model_name": cfg.served_base,
        "max_loras": cfg.resident,
        "max_cpu_loras": cfg.resident,
        "max_lora_rank": max_lora_rank(cfg.adapters),
        "health_interval_s": 1.0,
    }
    return {
        "engine": engine,
        "adapters_dir": str(adapters_dir),
        "registry": {"max_resident": cfg.resident},
        "routing": policy,
    }


def wait_engines_ready(url: str, n: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Until the gateway reports ``n`` engines, all ready (it probes each replica on its own)."""
    deadline = time.monotonic() + timeout_s
    while True:
        data: list[dict[str, Any]] = []
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            data = httpx.get(url + "/admin/engines", timeout=10, trust_env=False).json()["data"]
            if len(data) == n and all(e.get("state") == "ready" for e in data):
                return data
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway's engines are not all ready after {timeout_s:g} s: {data}")
        time.sleep(0.25)


def resident_by_engine(url: str) -> dict[str, list[str]]:
    data = httpx.get(url + "/admin/engines", timeout=10, trust_env=False).json()["data"]
    return {e["name"]: sorted(e.get("resident_models") or []) for e in data}


def measure(
    cfg: RoutingConfig,
    policy: str,
    gateway: Server,
    level: int,
    log: Log,
    progress: Progress | None,
    references: References | None = None,
) -> dict[str, Any]:
    """One (policy, level): the sweep with the gateway's counters read around it."""
    label = f"{policy} c={level}"
    names = [LOADS, LOAD_ERRORS, EVICTIONS]
    before = scrape_counters(gateway.url, names)
    on_done = None if progress is None else (lambda n: progress(label, n, cfg.requests))
    entry = sweep(cfg, gateway.url, workload(cfg, cfg.names), level, cfg.requests, on_done, references)
    after = scrape_counters(gateway.url, names)
    done = entry["summary"]["requests"]["completed"]
    loads = int(after[LOADS] - before[LOADS])
    entry["adapter_loads"] = loads
    entry["adapter_load_errors"] = int(after[LOAD_ERRORS] - before[LOAD_ERRORS])
    entry["adapter_evictions"] = int(after[EVICTIONS] - before[EVICTIONS])
    entry["loads_per_1000_requests"] = loads / done * 1000 if done else None
    entry["resident_after"] = resident_by_engine(gateway.url)
    s = entry["summary"]
    log(
        f"{label}: {s['request_throughput']:.2f} req/s, TTFT p50/p99 "
        f"{fmt_ms(s['ttft_ms']['p50'])}/{fmt_ms(s['ttft_ms']['p99'])} ms, {s['requests']['failed']} failed, "
        f"{loads} loads, {entry['adapter_evictions']} evictions"
        + (
            f", {entry['verify']['wrong']} of {entry['verify']['checked']} answers wrong"
            if "verify" in entry
            else ""
        )
    )
    return entry


def run_routing(cfg: RoutingConfig, *, log: Log = print, progress: Progress | None = None) -> dict[str, Any]:
    """Start the replicas, run both policies at each level, stop everything, write the report."""
    started = dt.datetime.now(dt.UTC)
    load_before = load_average()
    references = References()
    policies: dict[str, list[dict[str, Any]]] = {p: [] for p in POLICIES}
    memory: dict[str, Any] = {}
    with workdir(cfg.workdir, "lora-gateway-routing-") as work:
        if cfg.snapshot_base:  # a private copy: a shared cache may be rebuilt under a starting vLLM
            snap = work / "base" / cfg.served_base
            shutil.copytree(cfg.base, snap, dirs_exist_ok=True)
            cfg = dataclasses.replace(cfg, base=snap)
        adapters_dir = work / "adapters"
        for a in cfg.adapters:
            shutil.copytree(a, adapters_dir / Path(a).name, dirs_exist_ok=True)
        lora = LoraOptions(
            max_loras=cfg.resident, max_lora_rank=max_lora_rank(cfg.adapters), max_cpu_loras=cfg.resident
        )
        log(f"starting {cfg.replicas} vLLM replicas with --enable-lora; about a minute on a CPU")
        with contextlib.ExitStack() as stack:
            replicas = [
                stack.enter_context(
                    vllm_process(
                        cfg.base,
                        cfg.served_base,
                        work / f"vllm-{i}.log",
                        lora=lora,
                        extra_args=cfg.vllm_args,
                        name=f"vllm-{i}",
                        wait=False,
                    )
                )
                for i in range(cfg.replicas)
            ]
            for r in replicas:
                r.wait_ready()
            log("replicas ready at " + ", ".join(r.url for r in replicas) + "; warming them up")
            for r in replicas:
                warm_replica(cfg, r, adapters_dir / cfg.names[0])
            starts = 0
            for i, level in enumerate(cfg.concurrency):
                # both policies back to back at each level (alternating which goes first), so that
                # their ratio shares the machine's moment
                for policy in POLICIES if i % 2 == 0 else POLICIES[::-1]:
                    for r in replicas:
                        unload_all(r.url)
                    starts += 1
                    settings = gateway_settings(cfg, replicas, adapters_dir, policy)
                    with gateway_process(settings, work, name=f"gateway-{policy}-{starts}") as gw:
                        missing = set(cfg.names) - served_models(gw.url)
                        if missing:
                            raise RuntimeError(
                                f"the gateway did not register {sorted(missing)}:\n{gw.log_tail()}"
                            )
                        wait_engines_ready(gw.url, len(replicas))
                        policies[policy].append(measure(cfg, policy, gw, level, log, progress, references))
            memory["replicas"] = {r.name: tree_memory(r.pid) for r in replicas}
    from loadtest.routing.report import summarize_routing, write_routing_report

    payload: dict[str, Any] = {
        "kind": "routing",
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average_before": load_before,
        "machine": machine_info(),
        "config": cfg.to_dict(),
        "policies": policies,
        "memory": memory,
    }
    payload["summary"] = summarize_routing(payload)
    write_routing_report(cfg.out, payload)
    return payload
