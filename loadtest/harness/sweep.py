"""The ``run`` command's plan: one workload at each concurrency or rate level, one client.

Each level sends the same requests (same seed), so levels differ only in load. Results come
back as a JSON-ready payload (config, machine, per-level summaries and per-model breakdown)
plus the raw per-request records; ``loadtest.harness.report`` writes them.

With ``verify``, each distinct request is then sent once more, one at a time, and its answer is the
reference every response of the levels is checked against (``loadtest.harness.verify``): per level and per
model, how many differ and how many are another model's answer. The references are learned after the
levels, not before, so that they cannot warm vLLM's prefix cache for the measured requests; they are the
same answers either way (greedy, one request in the engine at a time).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from loadtest.harness import stats
from loadtest.harness.machine import machine_info
from loadtest.harness.records import RequestResult
from loadtest.harness.runner import LevelRun, OnResult, run_closed_loop, run_open_loop, run_sync
from loadtest.harness.senders import CLIENTS, Job, jobs_for, make_client, make_sender
from loadtest.harness.verify import SUMMED, References, learn_all, merge_summaries, request_key
from loadtest.harness.workload import WorkloadSpec, generate

Mode = Literal["concurrency", "rate"]


@dataclass(frozen=True, slots=True)
class SweepConfig:
    """What ``run`` does. ``requests`` and ``time_limit_s`` bound each level."""

    target: str
    workload: WorkloadSpec
    mode: Mode
    levels: Sequence[float]
    requests: int = 100
    api_key: str | None = None
    timeout_s: float = 60.0
    time_limit_s: float = 600.0
    warmup: int = 0
    max_connections: int | None = None
    client: str = "httpx"
    verify: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("concurrency", "rate"):
            raise ValueError(f"mode: must be 'concurrency' or 'rate', got {self.mode!r}")
        if not self.levels:
            raise ValueError("levels: give at least one level")
        if any(x <= 0 for x in self.levels):
            raise ValueError(f"levels: must all be > 0, got {list(self.levels)}")
        if self.mode == "concurrency" and any(int(x) != x for x in self.levels):
            raise ValueError(f"levels: concurrency levels must be integers, got {list(self.levels)}")
        if self.requests < 1:
            raise ValueError(f"requests: must be >= 1, got {self.requests}")
        if self.timeout_s <= 0 or self.time_limit_s <= 0:
            raise ValueError("timeout_s and time_limit_s: must be > 0")
        if self.client not in CLIENTS:
            raise ValueError(f"client: must be one of {CLIENTS}, got {self.client!r}")
        if self.verify and self.workload.temperature != 0:
            raise ValueError("verify: needs greedy requests (temperature 0) to have one right answer each")

    def connections(self) -> int:
        if self.max_connections:
            return self.max_connections
        return int(max(self.levels)) if self.mode == "concurrency" else 1024

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["levels"] = list(self.levels)
        d["workload"]["models"] = list(self.workload.models)
        d["api_key"] = "***" if self.api_key else None
        return d


@dataclass(slots=True)
class SweepResult:
    payload: dict[str, Any]
    records: list[tuple[float, list[RequestResult]]] = field(default_factory=list)


def level_summary(mode: Mode, level: float, run: LevelRun) -> dict[str, Any]:
    """One level's entry in ``results.json``."""
    summary = stats.summarize(run.records, duration_s=run.duration_s, requested=run.requested)
    return {
        "mode": mode,
        "level": level,
        "hit_time_limit": run.hit_time_limit,
        "summary": summary,
        "per_model": stats.per_model(run.records, duration_s=run.duration_s),
    }


def run_sweep(
    cfg: SweepConfig,
    *,
    on_level_start: Callable[[float, int], None] | None = None,
    on_result: OnResult | None = None,
    on_level_end: Callable[[dict[str, Any]], None] | None = None,
    references: References | None = None,
) -> SweepResult:
    """Run every level in turn; blocking (it runs its own event loop).

    With ``cfg.verify``, ``references`` (learned by earlier sweeps against the same server) are reused
    and extended with the requests they lack.
    """
    refs = references if references is not None else References()
    return run_sync(_sweep(cfg, on_level_start, on_result, on_level_end, refs))


async def learn_references(cfg: SweepConfig, jobs: Sequence[Job], refs: References) -> int:
    """Learn the reference answer of each (model, request) that ``refs`` lacks, one request at a time."""
    async with make_client(api_key=cfg.api_key, timeout_s=cfg.timeout_s, max_connections=1) as client:
        return await learn_all(client, [(j.spec.model, j.url, j.spec.body) for j in jobs], refs)


def check_level(records: Sequence[RequestResult], keys: dict[int, str], refs: References) -> dict[str, Any]:
    """Check one level's answered requests against the references; the level's ``verify`` entry."""
    level = refs.fresh()
    examples = []
    for rec in records:
        if not rec.ok or rec.text is None:
            continue
        verdict = level.check(rec.model, keys[rec.index], rec.text, rec.token_ids)
        if not verdict.ok and not verdict.near_tie and len(examples) < 5:
            examples.append({"index": rec.index, "model": rec.model, "as_model": verdict.as_model,
                             "near_tie": verdict.near_tie, "where": verdict.where, "text": rec.text[:200],
                             "reference": refs.text(rec.model, keys[rec.index])[:200]})  # fmt: skip
    return {**level.summary(), "examples": examples}


async def _sweep(
    cfg: SweepConfig,
    on_level_start: Callable[[float, int], None] | None,
    on_result: OnResult | None,
    on_level_end: Callable[[dict[str, Any]], None] | None,
    refs: References,
) -> SweepResult:
    started = dt.datetime.now(dt.UTC)
    jobs = jobs_for(cfg.target, generate(cfg.workload, cfg.requests))
    keys = {job.spec.index: request_key(job.spec.body) for job in jobs} if cfg.verify else {}
    result = SweepResult(payload={})
    levels: list[dict[str, Any]] = []
    sender = make_sender(
        cfg.client, api_key=cfg.api_key, timeout_s=cfg.timeout_s, max_connections=cfg.connections()
    )
    async with sender:
        for level in cfg.levels:
            if cfg.warmup:
                warm = dataclasses.replace(cfg.workload, seed=cfg.workload.seed + 1_000_003)
                warm_jobs = jobs_for(cfg.target, generate(warm, cfg.warmup))
                width = min(cfg.warmup, int(level) if cfg.mode == "concurrency" else 8)
                await run_closed_loop(sender, warm_jobs, width, time_limit_s=cfg.timeout_s, drain_s=0)
            if on_level_start is not None:
                on_level_start(level, len(jobs))
            if cfg.mode == "concurrency":
                run = await run_closed_loop(
                    sender,
                    jobs,
                    int(level),
                    time_limit_s=cfg.time_limit_s,
                    drain_s=cfg.timeout_s,
                    on_result=on_result,
                )
            else:
                run = await run_open_loop(
                    sender,
                    jobs,
                    level,
                    seed=cfg.workload.seed,
                    time_limit_s=cfg.time_limit_s,
                    drain_s=cfg.timeout_s,
                    on_result=on_result,
                )
            entry = level_summary(cfg.mode, level, run)
            levels.append(entry)
            result.records.append((level, run.records))
            if on_level_end is not None:
                on_level_end(entry)
        if cfg.verify:
            learned = await learn_references(cfg, jobs, refs)
            for entry, (_, records) in zip(levels, result.records, strict=True):
                entry["verify"] = check_level(records, keys, refs)
    result.payload = {
        "kind": "run",
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": cfg.to_dict(),
        "levels": levels,
    }
    if cfg.verify:
        totals = merge_summaries([e["verify"] for e in levels])
        result.payload["verify"] = {"references_learned": learned, **{k: totals[k] for k in SUMMED}}
    return result
