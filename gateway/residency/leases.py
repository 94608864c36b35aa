"""Which adapters are loaded in which engine: the only code that calls vLLM's load/unload routes.

acquire(engine, adapter) -> Lease
  resident?  yes -> count one more request in flight
             no  -> under the adapter's lock (singleflight: one load, the others wait for it)
                    make room, load it
Lease.release()  always, exactly once (success, error, client gone): the adapter becomes evictable.

Making room when every slot is taken: the least recently used idle adapter (not pinned) is unloaded.
When every resident adapter has requests in flight, the load waits for one to go idle. Under steady
traffic the popular ones never do, so a load that has waited `drain_after_s` *drains* one: the
resident adapter with the fewest requests in flight (then the least recently used) takes no new
requests; the ones it has finish; it is unloaded as soon as it is idle, within one generation time,
and no adapter starves behind busy ones. Requests for a draining adapter wait (the router sends them
to another replica that has it, if any), then load it again. Draining at once would be fairer but
costs loads: a drained adapter is usually still wanted, and reloading it drains another (measured
in docs/benchmarks.md). One adapter drains per overdue load, never more; when a load stops waiting
(it found room, or gave up), the drains it no longer needs are lifted. A load that finds no room
within `wait_timeout_s` answers 503 + Retry-After, and so does a request whose adapter drained for
longer than that.

on_probe(engine, listed)   after every successful probe of an engine
  `resident` := what vLLM really lists; adapters we had that vLLM lost (it restarted) are loaded
  again, pinned ones too; nothing is reported resident that vLLM does not have. An adapter this
  gateway loaded or unloaded after the probe asked for the listing keeps its state: the listing
  may predate that change (without this, a stale listing dropped adapters with requests in flight
  and brought back ones just evicted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from gateway.engines.base import Engine, ProbeResult
from gateway.errors import EngineUnavailableError, GatewayError, UpstreamError
from gateway.metrics import UNKNOWN, Metrics
from gateway.registry.catalog import AdapterRef
from gateway.upstream import UpstreamClient

log = logging.getLogger("lora_gateway.residency")


def _now() -> float:
    """The event loop's clock (time.monotonic() in production) for waits, deadlines and drains: a test's
    loop may run on virtual time. `touched` stays on time.monotonic(), the clock of a probe's start."""
    return asyncio.get_running_loop().time()


@dataclass
class _EngineBook:
    """Per-engine bookkeeping beside `engine.status` (which the admin API shows)."""

    lru: OrderedDict[str, None] = field(default_factory=OrderedDict)  # engine names, oldest first
    known: set[str] = field(default_factory=set)  # every name this gateway loaded (only those it retires)
    wanted: dict[str, AdapterRef] = field(
        default_factory=dict
    )  # what should be resident (restored on restart)
    pinned: set[str] = field(default_factory=set)
    retiring: set[str] = field(default_factory=set)  # no longer registered: unload once idle
    loading: int = 0  # loads under way: slots reserved for them
    overdue_loads: int = 0  # loads that waited `drain_after_s` for a slot: how many adapters may drain
    touched: dict[str, float] = field(default_factory=dict)  # loaded/unloaded by us: monotonic time
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # an adapter went idle, or drained, or left
    # Leases taken and given back, per adapter, since the gateway started: equal when nothing is in flight
    # (every lease is released exactly once); shown by /admin/engines.
    acquired: dict[str, int] = field(default_factory=dict)
    released: dict[str, int] = field(default_factory=dict)


class Lease:
    """One request's hold on one adapter in one engine; `release()` is idempotent."""

    __slots__ = ("_residency", "engine", "engine_name", "_released")

    def __init__(self, residency: Residency, engine: Engine, engine_name: str) -> None:
        self._residency = residency
        self.engine = engine
        self.engine_name = engine_name
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._residency._release(self.engine, self.engine_name)


class Residency:
    def __init__(
        self,
        client: UpstreamClient,
        metrics: Metrics,
        *,
        max_resident: int,
        restore_limit: int | None = None,
        wait_timeout_s: float = 30.0,
        drain_after_s: float = 1.0,
        retry_after_s: int = 5,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.max_resident = max_resident
        # After a restart, adapters loaded again at once besides the pinned ones (the most recently used
        # first): what vLLM keeps in memory. The others load on their next request.
        self.restore_limit = min(max_resident, restore_limit or max_resident)
        self.wait_timeout_s = wait_timeout_s
        self.drain_after_s = drain_after_s
        self.retry_after_s = retry_after_s
        self._books: dict[str, _EngineBook] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def book(self, engine: Engine) -> _EngineBook:
        book = self._books.get(engine.name)  # on every request: no throw-away _EngineBook
        if book is None:
            book = self._books[engine.name] = _EngineBook()
        return book

    # --- requests ------------------------------------------------------------------------------
    async def acquire(self, engine: Engine, ref: AdapterRef) -> Lease:
        status, key = engine.status, ref.engine_name
        if key in status.resident and key not in status.draining:  # the hot path
            self._hold(engine, self.book(engine), key)
            return Lease(self, engine, key)
        book = self.book(engine)
        started = _now()
        deadline = started + self.wait_timeout_s
        while True:
            if key in status.resident:
                if key not in status.draining:
                    break
                await self._wait(engine, book, deadline)  # it leaves (then we load it again) or stays
                continue
            async with book.locks.setdefault(key, asyncio.Lock()):
                if key in status.resident:  # another request loaded it while we waited for the lock
                    continue
                await self._make_room(engine, book, deadline)
                try:
                    await self._load(engine, ref)
                finally:
                    book.loading -= 1
                break
        self._hold(engine, book, key)
        self.metrics.adapter_wait.labels(ref.name).observe(_now() - started)
        return Lease(self, engine, key)

    def _hold(self, engine: Engine, book: _EngineBook, key: str) -> None:
        engine.status.in_flight[key] = engine.status.in_flight.get(key, 0) + 1
        book.acquired[key] = book.acquired.get(key, 0) + 1
        book.lru[key] = None
        book.lru.move_to_end(key)

    def _release(self, engine: Engine, key: str) -> None:
        book = self.book(engine)
        book.released[key] = book.released.get(key, 0) + 1
        in_flight = engine.status.in_flight
        in_flight[key] = max(0, in_flight.get(key, 0) - 1)
        if not in_flight[key]:
            del in_flight[key]
            self._notify(book)
            if key in book.retiring:
                self._spawn(self._retire_now(engine, key))

    @staticmethod
    def _notify(book: _EngineBook) -> None:
        book.changed.set()
        book.changed = asyncio.Event()

    async def _wait(
        self, engine: Engine, book: _EngineBook, deadline: float, wake_at: float | None = None
    ) -> None:
        """Wait for the next change of residency, or `wake_at`, or 1 s, whichever comes first (the
        caller then looks again); past `deadline`, 503 + Retry-After."""
        now = _now()
        remaining = deadline - now
        if remaining <= 0:
            raise EngineUnavailableError(
                f"All {self.max_resident} adapter slots of engine {engine.name} are busy; try again.",
                retry_after_s=self.retry_after_s,
                code="adapter_slots_busy",
            )
        with contextlib.suppress(TimeoutError):
            timeout = min(remaining, 1.0, 1.0 if wake_at is None else max(wake_at - now, 0.0))
            await asyncio.wait_for(book.changed.wait(), timeout=timeout)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def leases(self, engine: Engine) -> dict[str, dict[str, int]]:
        """Per adapter (engine name): leases acquired and released on this engine so far."""
        book = self.book(engine)
        return {k: {"acquired": n, "released": book.released.get(k, 0)} for k, n in book.acquired.items()}

    def forget(self, engine: Engine, key: str) -> None:
        """vLLM answered that it does not have `key` (restarted, or unloaded by someone else)."""
        book = self.book(engine)
        book.touched[key] = time.monotonic()
        engine.status.resident.discard(key)
        engine.status.draining.discard(key)
        book.lru.pop(key, None)
        self._observe_resident(engine)
        self._notify(book)

    async def _make_room(self, engine: Engine, book: _EngineBook, deadline: float) -> None:
        """Reserve a slot for one load: evict an idle adapter if the engine is full; after
        `drain_after_s` with none idle, drain a busy one."""
        drain_at = _now() + self.drain_after_s
        overdue = False
        try:
            while len(engine.status.resident) + book.loading >= self.max_resident:
                victim = self._eviction_candidate(engine, book)
                if victim is not None:
                    await self._evict(engine, book, victim)
                    continue
                if not overdue and _now() >= drain_at:
                    overdue = True
                    book.overdue_loads += 1
                if overdue:
                    self._drain(engine, book)
                await self._wait(engine, book, deadline, None if overdue else drain_at)
        finally:
            if overdue:
                book.overdue_loads -= 1
                self._undrain(engine, book)
        book.loading += 1

    def _ordered(self, engine: Engine, book: _EngineBook) -> list[str]:
        """Resident adapters, least recently used first (those of unknown age before all)."""
        resident = engine.status.resident
        return sorted(k for k in resident if k not in book.lru) + [k for k in book.lru if k in resident]

    def _eviction_candidate(self, engine: Engine, book: _EngineBook) -> str | None:
        status = engine.status
        for key in self._ordered(engine, book):
            if status.in_flight.get(key, 0) == 0 and key not in book.pinned and not self._locked(book, key):
                return key
        return None

    @staticmethod
    def _locked(book: _EngineBook, key: str) -> bool:
        """Being loaded, unloaded or retired right now: neither evicted nor drained."""
        lock = book.locks.get(key)
        return lock is not None and lock.locked()

    def _drain(self, engine: Engine, book: _EngineBook) -> None:
        """Stop admitting requests to busy adapters, one per overdue load, so that slots come free."""
        status = engine.status
        if len(status.draining) >= book.overdue_loads:
            return
        ordered = self._ordered(engine, book)
        age = {key: i for i, key in enumerate(ordered)}
        candidates = [
            k
            for k in ordered
            if k not in status.draining and k not in book.pinned and not self._locked(book, k)
        ]
        candidates.sort(key=lambda k: (status.in_flight.get(k, 0), age[k]))
        for key in candidates[: book.overdue_loads - len(status.draining)]:
            status.draining.add(key)
            self.metrics.adapter_drains.labels(self._label(book, key)).inc()
            log.info(
                "engine %s: draining adapter %s (%d in flight) to make room",
                engine.name,
                key,
                status.in_flight.get(key, 0),
            )

    def _undrain(self, engine: Engine, book: _EngineBook) -> None:
        """Lift the drains no waiting load needs any more (the busiest first): their requests go on."""
        status = engine.status
        excess = len(status.draining) - book.overdue_loads
        if excess <= 0:
            return
        busiest = sorted(status.draining, key=lambda k: -status.in_flight.get(k, 0))
        status.draining.difference_update(busiest[:excess])
        self._notify(book)

    @staticmethod
    def _label(book: _EngineBook, key: str) -> str:
        ref = book.wanted.get(key)  # an adapter someone else loaded has no registered name
        return ref.name if ref else UNKNOWN

    async def _evict(self, engine: Engine, book: _EngineBook, key: str) -> None:
        """Unload `key` under its own lock (load and unload of one adapter never overlap). The lock is
        free (see `_eviction_candidate`), so taking it does not wait; check again all the same."""
        async with book.locks.setdefault(key, asyncio.Lock()):
            status = engine.status
            if key in status.resident and not status.in_flight.get(key) and key not in book.pinned:
                await self.unload(engine, key, reason="evicted")

    # --- engine calls --------------------------------------------------------------------------
    async def _load(self, engine: Engine, ref: AdapterRef) -> None:
        if not engine.ready:
            raise EngineUnavailableError(
                f"Engine {engine.name} is not ready.", retry_after_s=self.retry_after_s
            )
        book = self.book(engine)
        book.touched[ref.engine_name] = time.monotonic()
        started = time.perf_counter()
        payload = {"lora_name": ref.engine_name, "lora_path": str(ref.path)}
        try:
            await self.client.post_json(engine.url("/v1/load_lora_adapter"), payload)
        except GatewayError as exc:
            if "already been loaded" not in exc.message:  # idempotent: vLLM has it, so do we
                self.metrics.adapter_loads.labels(ref.name, "error").inc()
                log.warning("engine %s: loading %s failed: %s", engine.name, ref.engine_name, exc.message)
                if isinstance(exc, EngineUnavailableError):
                    raise
                raise UpstreamError(
                    f"Loading adapter `{ref.name}` failed: {exc.message}", code="adapter_load_failed"
                ) from exc
        elapsed = time.perf_counter() - started
        self.metrics.adapter_loads.labels(ref.name, "ok").inc()
        self.metrics.adapter_load_duration.labels(ref.name).observe(elapsed)
        book.touched[ref.engine_name] = time.monotonic()
        engine.status.resident.add(ref.engine_name)
        engine.status.last_load_at[ref.engine_name] = time.time()
        book.wanted[ref.engine_name] = ref
        book.known.add(ref.engine_name)
        if ref.pinned:
            book.pinned.add(ref.engine_name)
        self._observe_resident(engine)
        log.info("engine %s: loaded adapter %s in %.1f ms", engine.name, ref.engine_name, elapsed * 1000)

    async def unload(self, engine: Engine, key: str, *, reason: str = "unloaded") -> None:
        """Unload one adapter; idempotent (an adapter vLLM does not have is already unloaded)."""
        book = self.book(engine)
        label = self._label(book, key)
        book.wanted.pop(key, None)
        book.touched[key] = time.monotonic()
        engine.status.resident.discard(key)
        engine.status.draining.discard(key)
        book.lru.pop(key, None)
        try:
            await self.client.post_json(engine.url("/v1/unload_lora_adapter"), {"lora_name": key})
        except GatewayError as exc:
            if exc.status_code != 404:
                log.warning("engine %s: unloading %s failed: %s", engine.name, key, exc.message)
        book.touched[key] = time.monotonic()
        engine.status.resident.discard(key)  # again: a listing older than the unload may have re-added it
        if reason == "evicted":
            self.metrics.adapter_evictions.labels(label).inc()
        self._observe_resident(engine)
        self._notify(book)  # requests waiting for it while it drained go and load it again
        log.info("engine %s: %s adapter %s", engine.name, reason, key)

    def _observe_resident(self, engine: Engine) -> None:
        self.metrics.resident_adapters.labels(engine.name).set(len(engine.status.resident))

    # --- preload, pins and reconciliation ------------------------------------------------------
    def want(self, engine: Engine, ref: AdapterRef) -> None:
        """Ask for `ref` to be resident on this engine whenever it is (re)ready."""
        book = self.book(engine)
        book.wanted[ref.engine_name] = ref
        if ref.pinned:
            book.pinned.add(ref.engine_name)

    async def sync(self, engine: Engine, registered: dict[str, AdapterRef]) -> None:
        """Follow the registry: pins, retired versions (unloaded once idle), pinned adapters loaded now."""
        book = self.book(engine)
        book.pinned = {key for key, ref in registered.items() if ref.pinned}
        book.retiring -= registered.keys()  # removed, then registered again (same bytes) before it went idle
        for key in list(book.wanted):
            if key not in registered:
                del book.wanted[key]
        for key in sorted(engine.status.resident | set(book.lru)):
            if key not in registered and key in book.known:
                book.retiring.add(key)
                if not engine.status.in_flight.get(key):
                    await self._retire_now(engine, key)
        book.retiring &= set(engine.status.resident)
        for key in sorted(book.pinned):
            ref = registered[key]
            book.wanted[key] = ref
            if engine.ready and key not in engine.status.resident:
                try:
                    (await self.acquire(engine, ref)).release()
                except GatewayError as exc:
                    log.warning("engine %s: could not load pinned %s: %s", engine.name, key, exc.message)

    async def _retire_now(self, engine: Engine, key: str) -> None:
        book = self.book(engine)
        lock = book.locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in book.retiring and not engine.status.in_flight.get(key):
                book.retiring.discard(key)
                await self.unload(engine, key, reason="retired")

    async def on_probe(self, engine: Engine, result: ProbeResult) -> None:
        status, book = engine.status, self.book(engine)
        changed = {key for key, at in book.touched.items() if at >= result.started_at}
        book.touched.clear()  # the next probe starts after every change made so far
        listed = set(result.adapters)
        lost = status.resident - listed - changed
        if lost:
            log.warning("engine %s lost adapters %s (restarted?); restoring", engine.name, sorted(lost))
        status.resident = (listed - changed) | (status.resident & changed)
        status.draining &= status.resident
        recency = {key: i for i, key in enumerate(book.lru)}  # before the lost ones leave it
        for key in list(book.lru):
            if key not in status.resident:
                book.lru.pop(key)
        self._observe_resident(engine)
        self.metrics.engine_up.labels(engine.name).set(1)
        missing = [ref for key, ref in book.wanted.items() if key not in status.resident]
        missing.sort(key=lambda r: (r.engine_name not in book.pinned, -recency.get(r.engine_name, -1)))
        for ref in missing:
            if len(status.resident) >= self.restore_limit and ref.engine_name not in book.pinned:
                break
            try:
                lease = await self.acquire(engine, ref)
                lease.release()
            except GatewayError as exc:
                log.warning("engine %s: could not restore %s: %s", engine.name, ref.engine_name, exc.message)
