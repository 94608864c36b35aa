"""gateway/residency/, with the engine's load/unload routes played by a fake vLLM (pure asyncio logic),
on an event loop with virtual time (no timing window: a sleep here is an ordering, not a duration).

The interleavings here are the ones a real vLLM produces only now and then (tests/test_residency_e2e.py
runs the real thing): a probe's listing that is older than a load or an eviction, an eviction racing a
load of the same adapter, a version registered again while its retirement waits for requests.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from gateway.engines.base import Engine, EngineState, ProbeResult
from gateway.errors import EngineUnavailableError
from gateway.metrics import UNKNOWN, Metrics
from gateway.registry.catalog import AdapterRef
from gateway.residency import Residency
from gateway.residency.loading import running_adapters

A = AdapterRef("a", "lora-a", Path("/store/a"))
B = AdapterRef("b", "lora-b", Path("/store/b"))
C = AdapterRef("c", "lora-c", Path("/store/c"))


class FakeVllm:
    """`post_json` of the upstream client: records calls; an unload can be held at a gate."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.busy: set[str] = set()
        self.overlaps: list[str] = []
        self.unload_gate = asyncio.Event()
        self.unload_gate.set()
        self.running: set[str] = set()  # what vLLM's scheduler runs (its /metrics says so)
        self.unloaded_while_running: list[str] = []

    async def get_text(self, url: str, *, timeout: float) -> tuple[int, str]:
        running = ",".join(sorted(self.running))
        return 200, (
            f'vllm:lora_requests_info{{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}} 1.0\n'
            f'vllm:lora_requests_info{{max_lora="2",running_lora_adapters="{running}",'
            f'waiting_lora_adapters=""}} 2.0\n'
        )

    async def get_json(self, url: str, *, timeout: float) -> Any:
        """`GET /v1/models`: the base and what is loaded (asked by gateways sharing this engine)."""
        return {"data": [{"id": "base"}, *({"id": name, "parent": "base"} for name in sorted(self.loaded))]}

    async def post_json(self, url: str, payload: Any) -> bytes:
        name, op = payload["lora_name"], url.rsplit("/", 1)[-1]
        if name in self.busy:
            self.overlaps.append(f"{op} {name} while another call on it runs")
        self.busy.add(name)
        try:
            self.calls.append((op, name))
            if op == "unload_lora_adapter":
                if name in self.running:
                    self.unloaded_while_running.append(name)
                await self.unload_gate.wait()
                self.loaded.discard(name)
            else:
                self.loaded.add(name)
            return b"ok"
        finally:
            self.busy.discard(name)


def setup(
    max_resident: int, wait_timeout_s: float = 5, drain_after_s: float = 0, restore_limit: int | None = None
) -> tuple[FakeVllm, Residency, Engine, Metrics]:
    vllm, metrics = FakeVllm(), Metrics()
    residency = Residency(
        vllm,  # type: ignore[arg-type]
        metrics,
        max_resident=max_resident,
        restore_limit=restore_limit,
        wait_timeout_s=wait_timeout_s,
        drain_after_s=drain_after_s,
    )
    engine = Engine("engine0", "http://vllm.invalid", vllm, probe_interval_s=1.0)  # type: ignore[arg-type]
    engine.status.state = EngineState.READY
    return vllm, residency, engine, metrics


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer whenever nothing is ready to run. Sleeps and
    timeouts (`drain_after_s`, `wait_timeout_s`) take no real time, and no load on the machine can
    stretch one past another: the interleavings below are the same on every run."""

    def __init__(self) -> None:
        super().__init__()
        self._virtual = 0.0

    def time(self) -> float:
        return self._virtual

    def _run_once(self) -> None:
        if not self._ready:  # type: ignore[attr-defined]
            timers = [h.when() for h in self._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
            if timers:
                self._virtual = max(self._virtual, min(timers))
        super()._run_once()  # type: ignore[misc]


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            runner.run(test())

    return run


def test_virtual_time_runs_timers_in_order_without_waiting() -> None:
    async def main() -> tuple[list[str], float]:
        order: list[str] = []

        async def after(delay: float, name: str) -> None:
            await asyncio.sleep(delay)
            order.append(name)

        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(
            after(30, "b"), after(10, "a"), asyncio.wait_for(after(60, "never"), 45), return_exceptions=True
        )
        return order, loop.time() - start

    started = time.monotonic()
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        order, elapsed = runner.run(main())
    assert order == ["a", "b"] and elapsed == 45
    assert time.monotonic() - started < 5


def loads(vllm: FakeVllm) -> list[str]:
    return [name for op, name in vllm.calls if op == "load_lora_adapter"]


@in_loop
async def test_a_listing_older_than_a_load_does_not_drop_it() -> None:
    vllm, residency, engine, _ = setup(max_resident=2)
    view = residency.view(engine)
    listing = ProbeResult(set())  # asked for before the load
    lease = await residency.acquire(engine, A)
    await residency.on_probe(engine, listing)
    assert view.resident == {"lora-a"}, "an adapter with a request in flight stays resident"
    assert loads(vllm) == ["lora-a"], "and is not loaded a second time"
    lease.release()
    await residency.on_probe(engine, ProbeResult(set()))  # a newer listing is the truth again
    assert loads(vllm) == ["lora-a", "lora-a"] and view.resident == {"lora-a"}  # restored


@in_loop
async def test_after_a_restart_pinned_and_most_recent_adapters_come_back_the_rest_on_demand() -> None:
    vllm, residency, engine, _ = setup(max_resident=4, restore_limit=2)
    view = residency.view(engine)
    pinned = AdapterRef("p", "lora-p", Path("/store/p"), pinned=True)
    for ref in (pinned, A, B, C, A):  # least recently used first: p, b, c, a
        (await residency.acquire(engine, ref)).release()
    vllm.loaded.clear()  # vLLM restarted: it lists none
    await residency.on_probe(engine, ProbeResult(set()))
    assert view.resident == {"lora-p", "lora-a"} == vllm.loaded  # pinned, then up to the limit
    assert loads(vllm)[-2:] == ["lora-p", "lora-a"]
    (await residency.acquire(engine, B)).release()  # the others load on their next request
    assert view.resident == {"lora-p", "lora-a", "lora-b"}
    await residency.on_probe(engine, ProbeResult(set(vllm.loaded)))
    assert "lora-c" not in vllm.loaded, "a probe restores no more than the limit"


@in_loop
async def test_a_prefetch_loads_into_free_room_only_and_evicts_nothing() -> None:
    vllm, residency, engine, _ = setup(max_resident=4, restore_limit=2)
    view = residency.view(engine)
    lease = await residency.acquire(engine, A)  # busy: a prefetch must not push it out
    residency.prefetch(engine, [A, B, C])
    await asyncio.sleep(1)
    assert loads(vllm) == ["lora-a", "lora-b"], "A is there already; B fills the room; C finds none"
    assert view.resident == {"lora-a", "lora-b"}
    lease.release()
    engine.status.state = EngineState.STARTING  # a prefetch into an engine that is not ready does nothing
    residency.prefetch(engine, [C])
    await asyncio.sleep(1)
    assert "lora-c" not in loads(vllm)
    engine.status.state = EngineState.READY
    vllm.loaded.clear()  # restarted: the prefetched B is wanted, as a start-up preload's are
    await residency.on_probe(engine, ProbeResult(set()))
    assert {"lora-b"} <= view.resident


@in_loop
async def test_a_listing_older_than_an_eviction_does_not_bring_it_back() -> None:
    vllm, residency, engine, _ = setup(max_resident=1)
    view = residency.view(engine)
    (await residency.acquire(engine, A)).release()
    listing = ProbeResult({"lora-a"})
    lease = await residency.acquire(engine, B)  # evicts a
    await residency.on_probe(engine, listing)
    assert view.resident == {"lora-b"} == vllm.loaded
    lease.release()


@in_loop
async def test_an_eviction_and_a_load_of_the_same_adapter_never_overlap() -> None:
    vllm, residency, engine, _ = setup(max_resident=1)
    (await residency.acquire(engine, A)).release()
    vllm.unload_gate.clear()
    want_b = asyncio.create_task(residency.acquire(engine, B))  # evicting a: its unload is held
    await asyncio.sleep(0.01)
    want_a = asyncio.create_task(residency.acquire(engine, A))
    await asyncio.sleep(0.01)
    assert vllm.calls[-1] == ("unload_lora_adapter", "lora-a"), "a's load waits for its unload"
    vllm.unload_gate.set()
    (await want_b).release()
    (await want_a).release()
    assert not vllm.overlaps
    assert vllm.calls[1:] == [
        ("unload_lora_adapter", "lora-a"),
        ("load_lora_adapter", "lora-b"),
        ("unload_lora_adapter", "lora-b"),
        ("load_lora_adapter", "lora-a"),
    ]


@in_loop
async def test_registered_again_before_going_idle_is_not_retired() -> None:
    vllm, residency, engine, _ = setup(max_resident=2)
    view = residency.view(engine)
    lease = await residency.acquire(engine, A)
    await residency.sync(engine, {})  # removed while a request is in flight: retire once idle
    await residency.sync(engine, {"lora-a": A})  # the same bytes registered again
    lease.release()
    await asyncio.sleep(0.01)
    assert ("unload_lora_adapter", "lora-a") not in vllm.calls and view.resident == {"lora-a"}


@in_loop
async def test_retired_once_the_last_request_ends() -> None:
    vllm, residency, engine, _ = setup(max_resident=2)
    view = residency.view(engine)
    lease = await residency.acquire(engine, A)
    await residency.sync(engine, {})
    assert view.resident == {"lora-a"}, "in flight: not yet"
    lease.release()
    await asyncio.sleep(0.01)
    assert vllm.calls[-1] == ("unload_lora_adapter", "lora-a") and not view.resident


@in_loop
async def test_adapters_of_unknown_age_go_first_under_no_label_of_their_own() -> None:
    vllm, residency, engine, metrics = setup(max_resident=2)
    view = residency.view(engine)
    await residency.on_probe(engine, ProbeResult({"lora-foreign"}))  # loaded by someone else
    (await residency.acquire(engine, A)).release()
    (await residency.acquire(engine, B)).release()
    assert view.resident == {"lora-a", "lora-b"}
    assert metrics.adapter_evictions.labels(UNKNOWN)._value.get() == 1
    assert metrics.adapter_evictions.labels("a")._value.get() == 0


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@in_loop
async def test_a_load_waits_drain_after_s_for_an_idle_slot_before_it_drains_one() -> None:
    vllm, residency, engine, metrics = setup(max_resident=2, drain_after_s=0.3)
    view = residency.view(engine)
    a1, b1 = await residency.acquire(engine, A), await residency.acquire(engine, B)
    want_c = asyncio.create_task(residency.acquire(engine, C))
    await asyncio.sleep(0.1)
    assert not view.draining, "not yet: a slot may come free by itself"
    b1.release()  # it does: nothing drained, b evicted because idle
    (await asyncio.wait_for(want_c, 1)).release()
    assert metrics.adapter_drains.labels("a")._value.get() == 0 and not view.draining
    want_b = asyncio.create_task(residency.acquire(engine, B))
    await asyncio.sleep(0.1)
    assert not view.draining  # c is idle: evicted at once, no drain
    b2 = await asyncio.wait_for(want_b, 1)
    want_c = asyncio.create_task(residency.acquire(engine, C))  # a and b busy now
    await asyncio.sleep(0.1)
    assert not view.draining
    await asyncio.sleep(0.35)
    assert view.draining in ({"lora-a"}, {"lora-b"}), "overdue: one busy adapter drains"
    a1.release()
    b2.release()
    (await asyncio.wait_for(want_c, 1)).release()
    assert not vllm.overlaps
    assert metrics.adapter_wait.labels("c")._sum.get() >= 0.4, "the wait is measured"


@in_loop
async def test_a_load_drains_the_least_busy_adapter_when_every_slot_is_busy() -> None:
    vllm, residency, engine, metrics = setup(max_resident=2)
    view = residency.view(engine)
    a1, a2 = await residency.acquire(engine, A), await residency.acquire(engine, A)
    b1 = await residency.acquire(engine, B)  # a: 2 in flight, b: 1; b is the more recently used
    want_c = asyncio.create_task(residency.acquire(engine, C))
    await settle()
    assert view.draining == {"lora-b"}, "the fewest requests in flight drains first"
    assert metrics.adapter_drains.labels("b")._value.get() == 1
    assert not want_c.done()
    (await residency.acquire(engine, A)).release()  # a takes new requests as before
    want_b = asyncio.create_task(residency.acquire(engine, B))
    await settle()
    assert not want_b.done(), "a draining adapter takes no new request"
    b1.release()  # b's last request ends: it goes at once, and c loads in its slot
    c1 = await asyncio.wait_for(want_c, 1)
    assert view.resident == {"lora-a", "lora-c"} and view.in_flight["lora-c"] == 1
    assert vllm.calls[-2:] == [("unload_lora_adapter", "lora-b"), ("load_lora_adapter", "lora-c")]
    await settle()  # the request that wanted b loads it again: c (1 in flight, not a's 2) drains now
    assert view.draining == {"lora-c"} and not want_b.done()
    c1.release()
    (await asyncio.wait_for(want_b, 1)).release()
    assert view.resident == {"lora-a", "lora-b"} and not view.draining
    a1.release()
    a2.release()
    assert not vllm.overlaps and metrics.adapter_evictions.labels("b")._value.get() == 1


@in_loop
async def test_a_drain_is_lifted_when_another_adapter_goes_idle_first() -> None:
    vllm, residency, engine, _ = setup(max_resident=2)
    view = residency.view(engine)
    a1 = await residency.acquire(engine, A)
    b1, b2 = await residency.acquire(engine, B), await residency.acquire(engine, B)
    want_c = asyncio.create_task(residency.acquire(engine, C))
    await settle()
    assert view.draining == {"lora-a"}
    want_a = asyncio.create_task(residency.acquire(engine, A))
    b1.release()
    b2.release()  # b is idle before a: b is evicted, a keeps its slot and takes requests again
    (await asyncio.wait_for(want_c, 1)).release()
    (await asyncio.wait_for(want_a, 1)).release()
    a1.release()
    assert not view.draining and view.resident == {"lora-a", "lora-c"}
    assert loads(vllm) == ["lora-a", "lora-b", "lora-c"], "a was never unloaded"


@in_loop
async def test_a_load_that_gives_up_lifts_its_drain_and_pinned_adapters_never_drain() -> None:
    pinned = AdapterRef("p", "lora-p", Path("/store/p"), pinned=True)
    vllm, residency, engine, _ = setup(max_resident=2, wait_timeout_s=0.2)
    view = residency.view(engine)
    p1, a1 = await residency.acquire(engine, pinned), await residency.acquire(engine, A)
    want_c = asyncio.create_task(residency.acquire(engine, C))
    await settle()
    assert view.draining == {"lora-a"}, "not the pinned one, though it is as busy"
    try:
        await want_c
    except EngineUnavailableError as exc:
        assert exc.code == "adapter_slots_busy" and exc.headers["Retry-After"] == str(residency.retry_after_s)
    else:
        raise AssertionError("c found no slot within wait_timeout_s: 503 expected")
    assert not view.draining, "nobody waits for a slot any more"
    a2 = await asyncio.wait_for(residency.acquire(engine, A), 0.01)  # a takes requests again, no wait
    for lease in (p1, a1, a2):
        lease.release()
    assert loads(vllm) == ["lora-p", "lora-a"]


@in_loop
async def test_requests_waiting_for_a_draining_adapter_go_on_when_the_load_gives_up() -> None:
    _, residency, engine, _ = setup(max_resident=1, wait_timeout_s=0.3)
    view = residency.view(engine)
    a1 = await residency.acquire(engine, A)
    want_b = asyncio.create_task(residency.acquire(engine, B))
    await settle()
    assert view.draining == {"lora-a"}
    await asyncio.sleep(0.1)
    want_a = asyncio.create_task(residency.acquire(engine, A))
    await settle()
    assert not want_a.done(), "a drains: its new request waits"
    try:
        await want_b
    except EngineUnavailableError as exc:
        assert exc.code == "adapter_slots_busy"
    else:
        raise AssertionError("a never went idle: b's load gives up with 503")
    a2 = await asyncio.wait_for(want_a, 0.1)  # woken when b gave up, long before its own deadline
    assert not view.draining and view.in_flight == {"lora-a": 2}
    a1.release()
    a2.release()


@in_loop
async def test_an_aborted_requests_adapter_stays_held_until_vllm_stops_running_it() -> None:
    """A client left (or a timeout): the gateway dropped the connection, but vLLM stops the request only at
    a later step. Until its metrics no longer show the adapter running, nothing may evict it."""
    vllm, residency, engine, _ = setup(max_resident=1, wait_timeout_s=30)
    lease = await residency.acquire(engine, A)
    vllm.running = {"lora-a"}
    lease.release_when_vllm_stops()
    want_b = asyncio.create_task(residency.acquire(engine, B))
    await asyncio.sleep(2)  # vLLM keeps running a's request for a while
    view = residency.view(engine)
    assert view.in_flight == {"lora-a": 1} and not want_b.done(), "a is still held: b waits for the slot"
    vllm.running = set()  # vLLM aborted it
    (await asyncio.wait_for(want_b, 5)).release()
    assert not vllm.unloaded_while_running and loads(vllm) == ["lora-a", "lora-b"]
    assert residency.leases(engine)["lora-a"] == {"acquired": 1, "released": 1}


@in_loop
async def test_an_aborted_lease_is_released_at_once_when_vllm_does_not_run_it() -> None:
    vllm, residency, engine, _ = setup(max_resident=2)
    lease = await residency.acquire(engine, A)
    lease.release_when_vllm_stops()  # vllm.running is empty
    await settle()
    assert residency.view(engine).in_flight == {}


def test_running_adapters_reads_the_newest_lora_info_sample() -> None:
    info = "vllm:lora_requests_info"
    text = (
        f"# TYPE {info} gauge\n"
        f'{info}{{max_lora="2",running_lora_adapters="lora-a,lora-b",waiting_lora_adapters="lora-c"}} '
        "1.7964e+09\n"
        f'{info}{{max_lora="2",running_lora_adapters="lora-b",waiting_lora_adapters=""}} 1.7965e+09\n'
        "vllm:num_requests_running 1.0\n"
    )
    assert running_adapters(text) == {"lora-b"}
    assert running_adapters("vllm:num_requests_running 0.0\n") is None
