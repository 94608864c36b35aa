"""Gateways sharing engines: each publishes its adapter use in the registry and reads the others' before it
evicts (gateway/residency/shared.py). On a real SQLite registry file (both backends: the store tests),
with vLLM's load and unload routes played by tests/test_residency.py's fake.

Without the sharing, gateway b evicts the adapter gateway a has a request in flight for (it is the oldest
in b's view, and a's request is not in b's counts): `test_without_sharing_b_evicts_what_a_is_using` shows
the failure the shared use prevents.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.engines.base import Engine, EngineState, ProbeResult
from gateway.errors import EngineUnavailableError
from gateway.metrics import Metrics
from gateway.registry.sqlite import SqliteStore
from gateway.registry.store import AdapterUse
from gateway.residency import Residency, policy
from gateway.residency.shared import SharedUse
from tests.test_residency import A, B, C, FakeVllm

URL = "http://vllm.invalid"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_last_use_on_any_gateway_orders_eviction() -> None:
    resident = {"a", "b", "c", "d"}
    order = policy.by_last_use(resident, {"a": 5.0, "b": 1.0}, {"b": 9.0, "c": 3.0})
    assert order == ["d", "c", "a", "b"]  # d: nobody used it; then c (3), a (5), b (9: used elsewhere)
    assert policy.add_counts({"a": 1}, {"a": 2, "b": 1}) == {"a": 3, "b": 1}


def test_published_use_is_seen_by_the_others_not_by_itself(tmp_path: Path) -> None:
    store, clock = SqliteStore(tmp_path / "r.sqlite3"), Clock()
    a = SharedUse(store, gateway="a", clock=clock, stale_after_s=10)
    b = SharedUse(store, gateway="b", clock=clock, stale_after_s=10)

    async def main() -> None:
        a.touch(URL, "x", 2, 990.0)
        a.touch(URL, "y", 0, 995.0)
        b.touch(URL, "x", 1, 998.0)
        await a.publish()
        await b.publish()
        seen_by_b = await b.others(URL)
        assert seen_by_b.in_flight == {"x": 2} and seen_by_b.last_used == {"x": 990.0, "y": 995.0}
        seen_by_a = await a.others(URL)
        assert seen_by_a.in_flight == {"x": 1} and seen_by_a.last_used == {"x": 998.0}
        assert (await a.others("http://other.invalid")).in_flight == {}

        clock.now += 11  # a stopped publishing (it died): its requests stop counting, its last use stays
        seen = await b.others(URL)
        assert seen.in_flight == {} and seen.last_used["x"] == 990.0
        await a.publish()  # a heartbeat: the busy row is written again, fresh
        assert (await b.others(URL)).in_flight == {"x": 2}

        await a.close()  # a clean stop takes its rows away
        assert (await b.others(URL)).last_used == {}

    asyncio.run(main())


def test_a_failed_publish_stays_due(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "r.sqlite3")

    class Down:
        def publish_uses(self, uses: object, *, expire_before: float) -> None:
            raise OSError("registry unreachable")

        def read_uses(self, engine: str) -> list[AdapterUse]:
            raise OSError("registry unreachable")

    shared = SharedUse(Down(), gateway="a")  # type: ignore[arg-type]

    async def main() -> None:
        shared.touch(URL, "x", 1, 1.0)
        with pytest.raises(OSError):
            await shared.publish()
        assert (await shared.others(URL)).in_flight == {}  # unreadable: decide alone
        shared.store = store
        await shared.publish()
        assert [(u.adapter, u.in_flight) for u in store.read_uses(URL)] == [("x", 1)]

    asyncio.run(main())


def gateway(vllm: FakeVllm, store: SqliteStore, name: str, *, share: bool = True) -> tuple[Residency, Engine]:
    shared = SharedUse(store, gateway=name) if share else None
    residency = Residency(vllm, Metrics(), max_resident=2, wait_timeout_s=2, drain_after_s=1, shared=shared)  # type: ignore[arg-type]
    engine = Engine(f"engine-{name}", URL, vllm, probe_interval_s=1.0)  # type: ignore[arg-type]
    engine.status.state = EngineState.READY
    return residency, engine


Pair = tuple[Residency, Engine, Residency, Engine]


async def two_gateways_b_used_a_then_b(vllm: FakeVllm, store: SqliteStore) -> Pair:
    """Gateways ga and gb over one engine; gb used adapter a, then b (so a is gb's oldest)."""
    ga, ea = gateway(vllm, store, "ga")
    gb, eb = gateway(vllm, store, "gb")
    (await gb.acquire(eb, A)).release()
    (await gb.acquire(eb, B)).release()
    return ga, ea, gb, eb


def published(residency: Residency) -> SharedUse:
    shared = residency._leases._shared  # noqa: SLF001 - the publisher's batch, without waiting for it
    assert shared is not None
    return shared


async def b_loads_c_while_a_uses_its_oldest(store: SqliteStore, *, share: bool) -> tuple[FakeVllm, Residency]:
    """Gateway a holds a request on adapter a; gateway b sees a and b resident (a the oldest) and
    needs c."""
    vllm = FakeVllm()
    ga, ea = gateway(vllm, store, "ga", share=share)
    gb, eb = gateway(vllm, store, "gb", share=share)
    (await gb.acquire(eb, A)).release()  # b used a first, then b: a is b's oldest
    (await gb.acquire(eb, B)).release()
    held = await ga.acquire(ea, A)  # a's request on adapter a, in flight
    if share:
        await published(ga).publish()
    (await gb.acquire(eb, C)).release()
    held.release()
    return vllm, gb


def test_b_does_not_evict_what_a_is_using(tmp_path: Path) -> None:
    vllm, gb = asyncio.run(b_loads_c_while_a_uses_its_oldest(SqliteStore(tmp_path / "r.sqlite3"), share=True))
    assert [op for op in vllm.calls if op[0] == "unload_lora_adapter"] == [("unload_lora_adapter", "lora-b")]
    assert vllm.loaded == {"lora-a", "lora-c"}  # (a loaded adapter a too: it had not probed vLLM yet)


def test_without_sharing_b_evicts_what_a_is_using(tmp_path: Path) -> None:
    vllm, _ = asyncio.run(b_loads_c_while_a_uses_its_oldest(SqliteStore(tmp_path / "r.sqlite3"), share=False))
    assert ("unload_lora_adapter", "lora-a") in vllm.calls  # the conflict the sharing removes


def test_a_load_waits_while_the_others_use_every_slot_and_goes_once_one_is_idle(tmp_path: Path) -> None:
    """Every slot busy on another gateway, none here: the load waits (it never unloads what gateway a is
    using) and goes as soon as a's request ends; while a's requests never end, it gets 503."""
    store = SqliteStore(tmp_path / "r.sqlite3")

    async def main() -> FakeVllm:
        vllm = FakeVllm()
        ga, ea, gb, eb = await two_gateways_b_used_a_then_b(vllm, store)
        held = [await ga.acquire(ea, A), await ga.acquire(ea, B)]
        await published(ga).publish()
        with pytest.raises(EngineUnavailableError):  # wait_timeout_s 2: a's requests outlast it
            await gb.acquire(eb, C)
        assert vllm.loaded == {"lora-a", "lora-b"}, "nothing a is using was unloaded"

        async def a_finishes() -> None:
            await asyncio.sleep(0.5)
            held[1].release()  # adapter b goes idle on a
            await published(ga).publish()

        finishing = asyncio.create_task(a_finishes())
        loop = asyncio.get_running_loop()
        started = loop.time()
        (await gb.acquire(eb, C)).release()
        assert 0.5 <= loop.time() - started < 1.5, "it went as soon as b was idle on a"
        await finishing
        held[0].release()
        return vllm

    vllm = asyncio.run(main())
    assert vllm.loaded == {"lora-a", "lora-c"}


def test_b_waits_for_the_load_a_announced_instead_of_making_room(tmp_path: Path) -> None:
    """One load for two gateways: a announced it is loading c; b, needing c, waits for vLLM to list it
    and adopts it: it evicts nothing and loads nothing."""
    store = SqliteStore(tmp_path / "r.sqlite3")

    async def main() -> FakeVllm:
        vllm = FakeVllm()
        ga, _, gb, eb = await two_gateways_b_used_a_then_b(vllm, store)
        await published(ga).announce(URL, "lora-c", 1)  # a's load of c is under way (a made room already)

        async def a_loaded() -> None:
            await asyncio.sleep(0.3)
            vllm.loaded.discard("lora-a")
            vllm.loaded.add("lora-c")

        loading = asyncio.create_task(a_loaded())
        calls = len(vllm.calls)
        (await gb.acquire(eb, C)).release()
        await loading
        assert vllm.calls[calls:] == [], "b neither evicted nor loaded"
        assert "lora-c" in gb.view(eb).resident
        return vllm

    asyncio.run(main())


def test_a_probe_showing_more_than_max_resident_trims_the_idle_least_recent(tmp_path: Path) -> None:
    """Each gateway loaded into the engine: 3 resident, max 2. The idle one least recently used by either
    goes; the one in flight on the other gateway stays."""
    store = SqliteStore(tmp_path / "r.sqlite3")

    async def main() -> FakeVllm:
        vllm = FakeVllm()
        ga, ea, gb, eb = await two_gateways_b_used_a_then_b(vllm, store)
        held = await ga.acquire(ea, C)  # a: c, in flight (a's view: only c resident, so no room made)
        await published(ga).publish()
        await published(gb).publish()
        assert vllm.loaded == {"lora-a", "lora-b", "lora-c"}
        await gb.on_probe(eb, ProbeResult(set(vllm.loaded)))
        assert vllm.loaded == {"lora-b", "lora-c"}, "a (oldest, idle everywhere) went; c (busy on a) stayed"
        held.release()
        return vllm

    asyncio.run(main())


def test_trimming_counts_only_this_registrys_adapters(tmp_path: Path) -> None:
    """An adapter nobody sharing this registry used (another registry's gateway loaded it on the same
    engine) neither goes nor makes ours go: with it, 3 are resident, but only 2 of ours (the maximum).
    Counting it, every probe unloaded an idle adapter of ours (seen in the full suite: churn, and an
    adapter dropped under a request another gateway had just sent)."""
    store = SqliteStore(tmp_path / "r.sqlite3")

    async def main() -> FakeVllm:
        vllm = FakeVllm()
        _, _, gb, eb = await two_gateways_b_used_a_then_b(vllm, store)
        await published(gb).publish()
        vllm.loaded.add("lora-foreign")
        calls = len(vllm.calls)
        await gb.on_probe(eb, ProbeResult(set(vllm.loaded)))
        assert vllm.calls[calls:] == [], "nothing trimmed"
        return vllm

    assert asyncio.run(main()).loaded == {"lora-a", "lora-b", "lora-foreign"}
