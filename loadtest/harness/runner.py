"""How requests are sent over time: closed loop or open loop, on one sender per run.

- closed loop (``run_closed_loop``): ``concurrency`` workers, each sends its next request as soon
  as the previous one ends, so exactly that many are in flight.
- open loop (``run_open_loop``): requests leave at Poisson arrival times at ``rate`` per second
  whatever the completions do (``vllm bench serve --request-rate``, vegeta); each record keeps
  its scheduled time, so generator lag is visible (``send_lag``).

Both are bounded by the number of jobs and by ``time_limit_s``: no request starts after the limit;
requests still in flight ``drain_s`` later are cancelled and recorded as ``cancelled``. What a job is
and the clients that send it: ``loadtest.harness.senders``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from loadtest.harness.parse import fail
from loadtest.harness.records import RequestResult
from loadtest.harness.senders import Job, Sender, SendError
from loadtest.harness.stats import duration_of
from loadtest.harness.workload import poisson_schedule

T = TypeVar("T")
OnResult = Callable[[RequestResult], None]


@dataclass(slots=True)
class LevelRun:
    """The records of one level, and how many jobs it held (the rest were never sent)."""

    records: list[RequestResult]
    requested: int
    duration_s: float
    hit_time_limit: bool


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh event loop, uvloop when installed (it ships with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is absent only on Windows
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def send_one(sender: Sender, job: Job, rec: RequestResult, t0: float) -> RequestResult:
    """Send ``job`` and fill ``rec`` in place (so a cancelled request's record survives)."""
    start = time.perf_counter()
    rec.start = start - t0
    try:
        await sender.send(job, rec, start)
    except SendError as exc:
        fail(rec, exc.kind, f"{exc.kind}: {exc}")
    except ValueError as exc:  # JSON that does not parse
        fail(rec, "bad_response", f"bad response: {exc}")
    if rec.e2e is None:
        rec.e2e = time.perf_counter() - start
    return rec


def _new_record(job: Job, scheduled: float | None = None) -> RequestResult:
    return RequestResult(index=job.spec.index, model=job.spec.model, tag=job.tag, scheduled=scheduled)


async def _finish(
    tasks: Sequence[asyncio.Task[Any]], records: list[RequestResult], t0: float, hard_deadline: float | None
) -> None:
    """Wait for ``tasks`` until ``hard_deadline``; cancel the rest and mark their records."""
    if not tasks:
        return
    timeout = None if hard_deadline is None else max(0.0, hard_deadline - time.perf_counter())
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    now = time.perf_counter() - t0
    for rec in records:
        if rec.e2e is None:
            rec.ok, rec.status, rec.error_kind = False, None, "cancelled"
            rec.error = "cancelled at the run's time limit"
            rec.e2e = max(0.0, now - rec.start)


def _deadlines(
    t0: float, time_limit_s: float | None, drain_s: float | None
) -> tuple[float | None, float | None]:
    if time_limit_s is None:
        return None, None
    soft = t0 + time_limit_s
    return soft, soft + (drain_s if drain_s is not None else 0.0)


def _level(records: list[RequestResult], requested: int, t0: float, soft: float | None) -> LevelRun:
    hit = soft is not None and (len(records) < requested or any(r.error_kind == "cancelled" for r in records))
    return LevelRun(records, requested, duration_of(records) if records else time.perf_counter() - t0, hit)


async def run_closed_loop(
    sender: Sender,
    jobs: Sequence[Job],
    concurrency: int,
    *,
    time_limit_s: float | None = None,
    drain_s: float | None = None,
    on_result: OnResult | None = None,
) -> LevelRun:
    """Keep ``concurrency`` requests in flight until the jobs or the time run out."""
    if concurrency < 1:
        raise ValueError(f"concurrency: must be >= 1, got {concurrency}")
    t0 = time.perf_counter()
    soft, hard = _deadlines(t0, time_limit_s, drain_s)
    records: list[RequestResult] = []
    queue = iter(jobs)

    async def worker() -> None:
        for job in queue:  # one shared iterator: each job is taken once
            if soft is not None and time.perf_counter() >= soft:
                return
            rec = _new_record(job)
            records.append(rec)
            await send_one(sender, job, rec, t0)
            if on_result is not None:
                on_result(rec)

    tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(jobs)))]
    await _finish(tasks, records, t0, hard)
    return _level(records, len(jobs), t0, soft)


async def run_open_loop(
    sender: Sender,
    jobs: Sequence[Job],
    rate: float,
    *,
    seed: int = 0,
    time_limit_s: float | None = None,
    drain_s: float | None = None,
    on_result: OnResult | None = None,
) -> LevelRun:
    """Send ``jobs`` at Poisson arrival times at ``rate`` req/s, not waiting for completions."""
    schedule = poisson_schedule(rate, len(jobs), seed)
    t0 = time.perf_counter()
    soft, hard = _deadlines(t0, time_limit_s, drain_s)
    records: list[RequestResult] = []
    tasks: list[asyncio.Task[Any]] = []

    async def one(job: Job, rec: RequestResult) -> None:
        await send_one(sender, job, rec, t0)
        if on_result is not None:
            on_result(rec)

    for job, at in zip(jobs, schedule, strict=True):
        if soft is not None and t0 + at >= soft:
            break
        # behind schedule: still yield once, so responses are read while catching up
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        rec = _new_record(job, scheduled=at)
        records.append(rec)
        tasks.append(asyncio.create_task(one(job, rec)))
    await _finish(tasks, records, t0, hard)
    return _level(records, len(jobs), t0, soft)
