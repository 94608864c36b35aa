"""``loadtest compare``: merged serving vs adapter-only serving, on servers it starts and stops itself.

    merged      vLLM without --enable-lora on the base with adapter 1 merged in (adapters/merge.py), behind a
                gateway of its own, as the adapter modes are (both pay the same relay)
                (skipped with ``merged=False``; ``single=False`` skips adapter-1)
    adapter-1   the gateway (attached) over vLLM --enable-lora on the base, every request to adapter 1
    adapter-N   the same gateway and vLLM, requests spread over all N adapters under the mix
    thrash      (``thrash=True``) the same vLLM behind a gateway keeping only ``thrash_resident``
                adapters loaded, the same mix as adapter-N (``loadtest.thrash.run``)
    engine-thrash  (``engine_thrash=True``) a third vLLM that keeps only ``thrash_resident`` adapters,
                behind a gateway that registers all N (``loadtest.thrash.run``)

The two vLLM servers start together (their slow CPU starts overlap; an idle vLLM costs ~1% of a
core) and stay up; at each concurrency the modes run back to back (closed loop, streaming, with
``ignore_eos`` so every mode generates the same number of tokens, and vLLM's ``return_token_ids``
so every token is a chunk), so that the ratios of one level share the machine's moment on a CPU
shared with other work. One gateway runs at a time over the LoRA vLLM (``loadtest.thrash.run.GatewaySlot``).
Around each level the gateway's ``/metrics`` give the adapter loads and evictions during it.
With ``repeat`` > 1 every level of every mode is measured that many times (a new request sequence
each time, the order of the modes alternating) and the numbers pool all its requests: a p99 over
``repeat`` x ``requests`` requests, with each repeat's p99 kept beside it to show the spread.
Memory is read from each vLLM's process tree (RSS, PSS; GPU memory where ``nvidia-smi`` exists)
and from file sizes: N merged models cost N copies of a merged model, adapter-only serving one
base plus N adapters.

    from loadtest.compare.run import CompareConfig, run_compare
    payload = run_compare(CompareConfig(base=Path("..."), adapters=[...], out=Path("out/compare")))
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.harness import stats
from loadtest.harness.level import adapter_counters, closed_level, counted, fmt_ms, stream_workload
from loadtest.harness.machine import machine_info
from loadtest.harness.records import RequestResult
from loadtest.harness.scenario import (
    attached_gateway,
    check_concurrency,
    check_names,
    config_dict,
    max_lora_rank,
    private_copies,
    workdir,
)
from loadtest.harness.verify import References, merge_summaries
from loadtest.harness.workload import WorkloadSpec
from loadtest.servers.processes import (
    LoraOptions,
    Server,
    dir_bytes,
    gateway_process,
    gpu_memory,
    tree_memory,
    vllm_process,
)
from loadtest.thrash.run import GatewaySlot

Log = Callable[[str], None]
Merger = Callable[[Path, Path, Path], Path]


@dataclass(frozen=True, slots=True)
class CompareConfig:
    """One comparison. Adapter names are their folder names; the first one is the merged one."""

    base: Path
    adapters: Sequence[Path]
    out: Path
    base_name: str | None = None
    mix: str = "zipf:1.1"
    concurrency: Sequence[int] = (1, 4, 16)
    requests: int = 64
    prompt_tokens: int = 64
    max_tokens: int = 32
    ignore_eos: bool = True
    max_loras: int | None = None
    thrash: bool = False
    thrash_resident: int | None = None
    engine_thrash: bool = False
    repeat: int = 1
    timeout_s: float = 300.0
    time_limit_s: float = 600.0
    client: str = "aiohttp"
    seed: int = 0
    vllm_args: Sequence[str] = ()
    workdir: Path | None = None
    merged: bool = True
    single: bool = True
    snapshot_base: bool = False
    verify: bool = False
    lora_compile: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.adapters:
            raise ValueError("adapters: give at least one adapter folder")
        names = self.names
        check_names(names)
        check_concurrency(self.concurrency)
        if (self.thrash or self.engine_thrash) and len(self.adapters) < 2:
            raise ValueError("thrash: needs at least 2 adapters")
        if self.repeat < 1:
            raise ValueError(f"repeat: must be >= 1, got {self.repeat}")
        if self.thrash_resident is not None and not 1 <= self.thrash_resident < len(self.adapters):
            raise ValueError(
                f"thrash_resident: must be 1..{len(self.adapters) - 1}, got {self.thrash_resident}"
            )
        WorkloadSpec(models=names, mix=self.mix)  # validates the mix

    @property
    def names(self) -> list[str]:
        return [Path(a).name for a in self.adapters]

    @property
    def served_base(self) -> str:
        return self.base_name or Path(self.base).name

    def resident_in_thrash(self) -> int:
        return self.thrash_resident or max(1, len(self.adapters) // 2)

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


def default_merger() -> Merger:
    try:
        from adapters.merge import merge_adapter
    except ImportError as exc:  # pragma: no cover - depends on the train extra
        raise RuntimeError(f"merged serving needs adapters.merge.merge_adapter: {exc}") from exc
    return merge_adapter


def memory_of(server: Server) -> dict[str, Any]:
    return {**tree_memory(server.pid), "gpu_bytes": gpu_memory(server.pid)}


@dataclass(slots=True)
class Measured:
    """One run of one level of one mode: its requests, and the gateway's counters around it."""

    records: list[RequestResult]
    summary: dict[str, Any]  # stats.summarize of `records`, as the sweep wrote it
    duration_s: float
    requested: int
    hit_time_limit: bool
    counters: dict[str, int] | None = None  # adapter_loads, adapter_load_errors, adapter_evictions
    verify: dict[str, Any] | None = None  # --verify: answers checked (loadtest.harness.sweep.check_level)


def pooled_entry(level: int, runs: Sequence[Measured]) -> dict[str, Any]:
    """A level's entry in ``results.json`` from one or more runs: statistics over all their
    requests (durations add up), counters summed, and each run's headline numbers in ``repeats``."""
    records = [r for m in runs for r in m.records]
    duration = sum(m.duration_s for m in runs)
    entry: dict[str, Any] = {
        "mode": "concurrency",
        "level": level,
        "hit_time_limit": any(m.hit_time_limit for m in runs),
        "summary": stats.summarize(records, duration_s=duration, requested=sum(m.requested for m in runs)),
        "per_model": stats.per_model(records, duration_s=duration),
    }
    if all(m.verify is not None for m in runs):
        entry["verify"] = merge_summaries([m.verify for m in runs if m.verify is not None])
    if all(m.counters is not None for m in runs):
        for key in ("adapter_loads", "adapter_load_errors", "adapter_evictions"):
            entry[key] = sum(m.counters[key] for m in runs if m.counters is not None)
        done = entry["summary"]["requests"]["completed"]
        entry["loads_per_1000_requests"] = entry["adapter_loads"] / done * 1000 if done else None
    if len(runs) > 1:
        entry["repeats"] = []
        for m in runs:
            s = m.summary
            entry["repeats"].append(
                {
                    "completed": s["requests"]["completed"],
                    "output_token_throughput": s["output_token_throughput"],
                    "ttft_p50_ms": s["ttft_ms"]["p50"],
                    "ttft_p99_ms": s["ttft_ms"]["p99"],
                    **({"adapter_loads": m.counters["adapter_loads"]} if m.counters is not None else {}),
                }
            )
    return entry


class Runner:
    """Runs each mode's levels against one URL, reading the gateway's counters around each level."""

    def __init__(self, cfg: CompareConfig, log: Log) -> None:
        self.cfg, self.log = cfg, log
        self.references: dict[str, References] = {}  # per URL: answers learned once, reused by every level

    def workload(self, models: Sequence[str], seed: int | None = None) -> WorkloadSpec:
        return stream_workload(self.cfg, models, seed)

    def sweep(self, url: str, workload: WorkloadSpec, level: int, requests: int) -> Measured:
        references = self.references.setdefault(url, References())
        entry, records = closed_level(self.cfg, url, workload, level, requests, references=references)
        s = entry["summary"]
        return Measured(
            records=records,
            summary=s,
            duration_s=s["duration_s"],
            requested=s["requests"]["requested"],
            hit_time_limit=entry["hit_time_limit"],
            verify=entry.get("verify"),
        )

    def warm(self, url: str, models: Sequence[str]) -> None:
        """One request to every model in turn, unmeasured: each is loaded before the first level (a mix
        drawn at random would leave some out), and the first requests of a vLLM are slow."""
        for model in models:
            self.sweep(url, self.workload([model], seed=self.cfg.seed + 99), 1, 1)

    def level(
        self, name: str, url: str, models: Sequence[str], c: int, metrics_url: str | None, repeat: int = 0
    ) -> Measured:
        """One run of a concurrency level, with the gateway's load and eviction counters read around it.
        Repeat k draws its own request sequence (seed + k)."""
        before = adapter_counters(metrics_url) if metrics_url else None
        run = self.sweep(url, self.workload(models, seed=self.cfg.seed + repeat), c, self.cfg.requests)
        if metrics_url is not None and before is not None:
            run.counters = counted(before, adapter_counters(metrics_url))
        s = run.summary
        of = f" (repeat {repeat + 1}/{self.cfg.repeat})" if self.cfg.repeat > 1 else ""
        checked = f", {run.verify['wrong']} of {run.verify['checked']} answers wrong" if run.verify else ""
        self.log(
            f"{name} c={c}{of}: {s['request_throughput']:.2f} req/s, "
            f"{s['output_token_throughput']:.1f} tok/s, "
            f"TTFT p50/p99 {fmt_ms(s['ttft_ms']['p50'])}/{fmt_ms(s['ttft_ms']['p99'])} ms, "
            f"{s['requests']['failed']} failed{checked}"
            + (
                f", {run.counters['adapter_loads']} loads, {run.counters['adapter_evictions']} evictions"
                if run.counters is not None
                else ""
            )
        )
        return run


def gateway_settings(
    cfg: CompareConfig,
    vllm: Server,
    adapters_dir: Path,
    resident: int,
    *,
    max_loras: int | None = None,
    max_cpu_loras: int | None = None,
) -> dict[str, Any]:
    """A gateway over one LoRA vLLM of the comparison, keeping ``resident`` adapters loaded."""
    n = len(cfg.adapters)
    return attached_gateway(
        cfg,
        [vllm.url],
        adapters_dir,
        resident=resident,
        max_loras=max_loras or cfg.max_loras or n,
        max_cpu_loras=max_cpu_loras or n,
        health_interval_s=2.0,
    )


def merged_gateway_settings(merged: Server, merged_dir: Path, name: str, work: Path) -> dict[str, Any]:
    """A gateway in front of the merged vLLM, so that both sides of the comparison pay the same relay
    (on a 2-core machine the gateway's CPU is taken from the engine's)."""
    empty = work / "no-adapters"
    empty.mkdir(parents=True, exist_ok=True)
    engine = {"mode": "attached", "url": merged.url, "model": str(Path(merged_dir).absolute()),
              "served_model_name": name, "health_interval_s": 2.0}  # fmt: skip
    return {"engine": engine, "adapters_dir": str(empty), "registry": {"seed_adapters_dir": False}}


def run_compare(cfg: CompareConfig, *, merger: Merger | None = None, log: Log = print) -> dict[str, Any]:
    """Start, measure and stop every server; write the report; return the payload."""
    started = dt.datetime.now(dt.UTC)
    merge = merger or default_merger()
    names, n = cfg.names, len(cfg.adapters)
    modes: dict[str, list[dict[str, Any]]] = {}
    memory: dict[str, Any] = {}
    runner = Runner(cfg, log)
    with workdir(cfg.workdir, "lora-gateway-compare-") as work:
        cfg, adapters_dir = private_copies(cfg, work)
        merged_dir = None
        if cfg.merged:
            log(f"merging {names[0]} into {cfg.base}")
            merged_dir = Path(merge(Path(cfg.base), Path(cfg.adapters[0]), work / "merged" / names[0]))
        rank = max_lora_rank(cfg.adapters)
        lora = LoraOptions(
            max_loras=cfg.max_loras or n, max_lora_rank=rank, max_cpu_loras=n, compile=cfg.lora_compile
        )
        what = "merged, and the base with --enable-lora" if merged_dir else "the base with --enable-lora"
        log(f"starting vLLM ({what}); about a minute on a CPU")
        slots = cfg.resident_in_thrash()
        with contextlib.ExitStack() as stack:
            if merged_dir is not None:
                log_path = work / "vllm-merged.log"
                merged = stack.enter_context(
                    vllm_process(merged_dir, names[0], log_path, extra_args=cfg.vllm_args, wait=False)
                )

            def lora_vllm(options: LoraOptions, name: str) -> Server:
                log_path = work / f"{name}.log"
                return stack.enter_context(
                    vllm_process(
                        cfg.base,
                        cfg.served_base,
                        log_path,
                        lora=options,
                        extra_args=cfg.vllm_args,
                        name=name,
                        wait=False,
                    )
                )

            base = lora_vllm(lora, "vllm-lora")
            if cfg.engine_thrash:  # its own vLLM: --max-loras and --max-cpu-loras are fixed at start
                options = dataclasses.replace(lora, max_loras=slots, max_cpu_loras=slots)
                vllm_slots = lora_vllm(options, "vllm-slots")
            merged_gw: Server | None = None
            if merged_dir is not None:
                merged.wait_ready()
                settings = merged_gateway_settings(merged, merged_dir, names[0], work)
                merged_gw = stack.enter_context(gateway_process(settings, work, name="gateway-merged"))
            base.wait_ready()
            memory["lora_idle"] = memory_of(base)
            engine_gw: Server | None = None
            if cfg.engine_thrash:
                vllm_slots.wait_ready()
                settings = gateway_settings(
                    cfg, vllm_slots, adapters_dir, n, max_loras=slots, max_cpu_loras=slots
                )
                engine_gw = stack.enter_context(gateway_process(settings, work, name="gateway-slots"))
                runner.warm(engine_gw.url, names)
                log(f"gateway over vLLM with {slots} LoRA slots at {engine_gw.url}")
            resident = {"all": n, "thrash": slots}  # one gateway at a time over the LoRA vLLM

            def gateway_keeping(k: int) -> dict[str, Any]:
                return gateway_settings(cfg, base, adapters_dir, k)

            slot = GatewaySlot(base, names, resident, gateway_keeping, work, log)
            stack.enter_context(contextlib.closing(slot))
            plan = {"all": (["adapter_1"] if cfg.single else []) + ["adapter_n"], "thrash": ["thrash"]}
            plan["engine"] = ["engine_thrash"]
            label = {"adapter_1": "adapter-1", "adapter_n": f"adapter-{n}", "thrash": "thrash"}
            label["engine_thrash"] = f"engine-thrash ({slots} slots)"
            kinds = ["all"] + (["thrash"] if cfg.thrash else []) + (["engine"] if cfg.engine_thrash else [])
            runs: dict[str, dict[int, list[Measured]]] = {}
            for rep in range(cfg.repeat):
                for i, c in enumerate(cfg.concurrency):
                    # the modes of one level run back to back, so their ratios share the machine's
                    # moment; their order alternates; the gateway in use last stays for the next level
                    if merged_dir is not None and merged_gw is not None:
                        if i == 0 and rep == 0:
                            runner.warm(merged_gw.url, names[:1])
                        run = runner.level("merged", merged_gw.url, names[:1], c, None, rep)
                        runs.setdefault("merged", {}).setdefault(c, []).append(run)
                        memory["merged"] = memory_of(merged)
                    for kind in kinds if (i + rep) % 2 == 0 else kinds[::-1]:
                        gw = engine_gw if kind == "engine" and engine_gw is not None else slot.use(kind)
                        for mode in plan[kind]:
                            models = names[:1] if mode == "adapter_1" else names
                            if kind != "engine" and mode not in slot.warmed:
                                runner.warm(gw.url, models)
                                slot.warmed.add(mode)
                            run = runner.level(label[mode], gw.url, models, c, gw.url, rep)
                            runs.setdefault(mode, {}).setdefault(c, []).append(run)
                            if mode == "adapter_n":
                                m = memory_of(base)
                                if (m["rss_bytes"] or 0) >= (memory.get("lora", {}).get("rss_bytes") or 0):
                                    memory["lora"] = m
            modes = {
                mode: [pooled_entry(c, by_level[c]) for c in cfg.concurrency if c in by_level]
                for mode, by_level in runs.items()
            }
        files = {
            "base_bytes": dir_bytes(cfg.base),
            "merged_bytes": None if merged_dir is None else dir_bytes(merged_dir),
            "adapter_bytes": {name: dir_bytes(adapters_dir / name) for name in names},
        }
    from loadtest.compare.report import summarize_compare, write_compare_report

    payload: dict[str, Any] = {
        "kind": "compare",
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            **cfg.to_dict(),
            "thrash_resident": cfg.resident_in_thrash() if cfg.thrash or cfg.engine_thrash else None,
        },
        "modes": modes,
        "memory": {"processes": memory, "files": files},
    }
    payload["summary"] = summarize_compare(payload)
    write_compare_report(cfg.out, payload)
    return payload
