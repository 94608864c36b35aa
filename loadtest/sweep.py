"""The ``run`` command's plan: one workload at each concurrency or rate level, one client.

Each level sends the same requests (same seed), so levels differ only in load. Results come
back as a JSON-ready payload (config, machine, per-level summaries and per-model breakdown)
plus the raw per-request records; ``loadtest.report`` writes them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from loadtest import stats
from loadtest.machine import machine_info
from loadtest.records import RequestResult
from loadtest.runner import (
    CLIENTS,
    LevelRun,
    OnResult,
    jobs_for,
    make_sender,
    run_closed_loop,
    run_open_loop,
    run_sync,
)
from loadtest.workload import WorkloadSpec, generate

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
) -> SweepResult:
    """Run every level in turn; blocking (it runs its own event loop)."""
    return run_sync(_sweep(cfg, on_level_start, on_result, on_level_end))


async def _sweep(
    cfg: SweepConfig,
    on_level_start: Callable[[float, int], None] | None,
    on_result: OnResult | None,
    on_level_end: Callable[[dict[str, Any]], None] | None,
) -> SweepResult:
    started = dt.datetime.now(dt.UTC)
    jobs = jobs_for(cfg.target, generate(cfg.workload, cfg.requests))
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
    result.payload = {
        "kind": "run",
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": cfg.to_dict(),
        "levels": levels,
    }
    return result
