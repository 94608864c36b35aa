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
import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from gateway.admin_client import AdminError, call
from loadtest.harness.level import adapter_counters, closed_level, counted, fmt_ms, stream_workload
from loadtest.harness.machine import load_average, machine_info
from loadtest.harness.scenario import (
    attached_gateway,
    check_concurrency,
    check_names,
    config_dict,
    max_lora_rank,
    private_copies,
    require_registered,
    unload_all,
    workdir,
)
from loadtest.harness.verify import References
from loadtest.harness.workload import WorkloadSpec
from loadtest.servers.processes import LoraOptions, Server, gateway_process, tree_memory, vllm_process

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
        check_names(names)
        if self.replicas < 2:
            raise ValueError(f"replicas: routing needs at least 2, got {self.replicas}")
        if self.resident < 1:
            raise ValueError(f"resident: must be >= 1, got {self.resident}")
        if len(names) <= self.resident:
            raise ValueError(
                f"adapters: give more than --resident ({self.resident}) so that adapters must move, "
                f"got {len(names)}"
            )
        check_concurrency(self.concurrency)
        WorkloadSpec(models=names, mix=self.mix)  # validates the mix

    @property
    def names(self) -> list[str]:
        return [Path(a).name for a in self.adapters]

    @property
    def served_base(self) -> str:
        return self.base_name or Path(self.base).name

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


def warm_replica(cfg: RoutingConfig, vllm: Server, adapter: Path) -> None:
    """Unmeasured: a few base-model requests, then one adapter loaded, used and unloaded directly on
    vLLM (the first requests of a vLLM, and its first LoRA step, are slow)."""
    closed_level(cfg, vllm.url, stream_workload(cfg, [cfg.served_base], seed=cfg.seed + 99), 1, 3)
    name = "warm-" + adapter.name
    with httpx.Client(base_url=vllm.url, timeout=120, trust_env=False) as c:
        body = {"lora_name": name, "lora_path": str(adapter)}
        c.post("/v1/load_lora_adapter", json=body).raise_for_status()
    closed_level(cfg, vllm.url, stream_workload(cfg, [name], seed=cfg.seed + 98), 1, 2)
    unload_all(vllm.url)


def gateway_settings(
    cfg: RoutingConfig, replicas: Sequence[Server], adapters_dir: Path, policy: str
) -> dict[str, Any]:
    urls = [r.url for r in replicas]
    k = cfg.resident
    settings = attached_gateway(
        cfg, urls, adapters_dir, resident=k, max_loras=k, max_cpu_loras=k, health_interval_s=1.0
    )
    return {**settings, "routing": policy}


def wait_engines_ready(url: str, n: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Until the gateway reports ``n`` engines, all ready (it probes each replica on its own)."""
    deadline = time.monotonic() + timeout_s
    while True:
        data: list[dict[str, Any]] = []
        with contextlib.suppress(AdminError, KeyError):
            data = engines(url)
            if len(data) == n and all(e.get("state") == "ready" for e in data):
                return data
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway's engines are not all ready after {timeout_s:g} s: {data}")
        time.sleep(0.25)


def engines(url: str) -> list[dict[str, Any]]:
    """The gateway's ``/admin/engines`` list (no admin token: the scenarios' gateways set none)."""
    return call(url, None, "GET", "/admin/engines", timeout=10, trust_env=False)["data"]


def resident_by_engine(url: str) -> dict[str, list[str]]:
    return {e["name"]: sorted(e.get("resident_models") or []) for e in engines(url)}


def measure(
    cfg: RoutingConfig,
    policy: str,
    gateway: Server,
    level: int,
    log: Log,
    progress: Progress | None,
    references: References | None = None,
) -> dict[str, Any]:
    """One (policy, level): the sweep with the gateway's counters read around it. Both policies send the
    same requests to the same replicas, so one set of ``references`` serves the whole run."""
    label = f"{policy} c={level}"
    before = adapter_counters(gateway.url)
    on_done = None if progress is None else (lambda n: progress(label, n, cfg.requests))
    workload = stream_workload(cfg, cfg.names)
    entry, _ = closed_level(
        cfg, gateway.url, workload, level, cfg.requests, references=references, on_done=on_done
    )
    entry.update(counted(before, adapter_counters(gateway.url)))
    done = entry["summary"]["requests"]["completed"]
    loads = entry["adapter_loads"]
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
        cfg, adapters_dir = private_copies(cfg, work)
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
                        require_registered(gw, cfg.names)
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
