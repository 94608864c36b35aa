"""The routing policy, as pure logic: engines are real `Engine` objects whose state is set by hand, and so
is what each has resident (in the gateway, residency owns it; routing reads it through a view)."""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from gateway.engines.base import Engine, EngineState
from gateway.errors import EngineUnavailableError
from gateway.registry.catalog import AdapterRef, Target
from gateway.residency.state import EngineResidency, ResidencyView
from gateway.routing import Router


class Replica(Engine):
    """An engine, with the residency state a test writes by hand beside it."""

    def __init__(self, name: str, resident: Collection[str], active: int) -> None:
        super().__init__(name, f"http://{name}", client=None, probe_interval_s=1)  # type: ignore[arg-type]
        self.status.state = EngineState.READY
        self.status.active = active
        self.residency = EngineResidency(resident=set(resident))


def engine(name: str, *, resident: Collection[str] = frozenset(), active: int = 0) -> Replica:
    return Replica(name, resident, active)


def routed(engines: Sequence[Replica], **options: Any) -> Router:
    return Router(engines, residency=lambda e: ResidencyView(cast(Replica, e).residency), **options)


def adapter(name: str) -> Target:
    return Target(name, f"lora-{name}", AdapterRef(name, f"lora-{name}", Path("/x")))


BASE = Target("base", "base")


def test_base_requests_go_to_the_least_loaded() -> None:
    a, b = engine("a", active=3), engine("b", active=1)
    assert routed([a, b], retry_after_s=1, max_resident=4).pick(BASE) is b


def test_affinity_beats_lower_load_until_saturation() -> None:
    a, b = engine("a", active=0), engine("b", resident={"lora-sql"}, active=5)
    router = routed([a, b], retry_after_s=1, max_resident=4, spread_at=8)
    assert router.pick(adapter("sql")) is b
    b.status.active = 9  # saturated: the hot adapter spreads to the replica with room
    assert router.pick(adapter("sql")) is a
    a.residency.resident = {"lora-1", "lora-2", "lora-3", "lora-4"}  # no free slot there: stay
    assert router.pick(adapter("sql")) is b


def test_vllm_queue_counts_as_load() -> None:
    a, b = engine("a", active=1), engine("b", active=1)
    a.status.waiting = 10
    assert routed([a, b], retry_after_s=1, max_resident=4).pick(BASE) is b


def test_cold_adapter_prefers_free_slots_and_a_stable_home() -> None:
    a, b = engine("a", resident={"lora-1", "lora-2"}), engine("b")
    router = routed([a, b], retry_after_s=1, max_resident=2)
    assert all(router.pick(adapter(f"x{i}")) is b for i in range(20)), "only b has a free slot"
    c, d = engine("c"), engine("d")
    router = routed([c, d], retry_after_s=1, max_resident=2)
    homes = {f"x{i}": router.pick(adapter(f"x{i}")) for i in range(40)}
    assert all(router.pick(adapter(name)) is homes[name] for name in homes), "same adapter, same replica"
    assert 10 <= sum(h is c for h in homes.values()) <= 30, "cold adapters spread over replicas"


def test_unavailable_engines_are_skipped_and_none_is_503() -> None:
    a, b = engine("a"), engine("b")
    router = routed([a, b], retry_after_s=7, max_resident=2)
    a.status.cooldown_until = time.monotonic() + 60
    assert {router.pick(BASE) for _ in range(5)} == {b}
    with pytest.raises(EngineUnavailableError) as info:
        router.pick(BASE, exclude=[b])
    assert info.value.status_code == 503 and info.value.headers["Retry-After"] == "7"


def test_round_robin_baseline_cycles() -> None:
    a, b, c = engine("a", resident={"lora-sql"}), engine("b"), engine("c")
    router = routed([a, b, c], retry_after_s=1, max_resident=2, policy="round_robin")
    assert [router.pick(adapter("sql")).name for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def simulate_loads(policy: str, requests: list[str], replicas: int = 2, slots: int = 2) -> int:
    """Count adapter loads for a request sequence, with LRU eviction per replica (requests are instant)."""
    engines = [engine(f"e{i}") for i in range(replicas)]
    lru = {e.name: OrderedDict() for e in engines}
    router = routed(engines, retry_after_s=1, max_resident=slots, policy=policy)
    loads = 0
    for name in requests:
        target = adapter(name)
        e = router.pick(target)
        key = target.adapter.engine_name
        if key not in e.residency.resident:
            loads += 1
            if len(e.residency.resident) >= slots:
                victim, _ = lru[e.name].popitem(last=False)
                e.residency.resident.discard(victim)
            e.residency.resident.add(key)
        lru[e.name][key] = None
        lru[e.name].move_to_end(key)
    return loads


def test_affinity_loads_at_most_a_third_of_round_robin() -> None:
    """More adapters than one replica holds, fewer than all replicas hold: affinity keeps each at home."""
    rng = random.Random(0)
    requests = [rng.choice(["a1", "a2", "a3", "a4"]) for _ in range(1000)]
    affinity, round_robin = simulate_loads("affinity", requests), simulate_loads("round_robin", requests)
    assert affinity * 3 <= round_robin, (affinity, round_robin)


def test_dns_discovery_survives_a_name_that_does_not_resolve_yet() -> None:
    """A headless Service with no pod yet: the gateway starts (503s) instead of crashing."""
    import asyncio

    from gateway.engines.pool import EnginePool
    from gateway.settings import Settings

    async def go() -> int:
        settings = Settings(
            engine={
                "mode": "attached",
                "url": "http://no-such-host.invalid:8000",
                "resolve_dns": True,
                "dns_refresh_s": 60,
            }
        )
        pool = EnginePool(settings, client=None)  # type: ignore[arg-type]
        await pool.start()
        try:
            return len(pool.engines)
        finally:
            await pool.stop()

    assert asyncio.run(go()) == 0


def test_a_draining_adapter_is_not_warm_there() -> None:
    a, b = engine("a", resident={"lora-sql"}, active=0), engine("b", resident={"lora-sql"}, active=3)
    router = routed([a, b], retry_after_s=1, max_resident=4)
    assert router.pick(adapter("sql")) is a
    a.residency.draining = {"lora-sql"}  # a is making room: its new requests would wait for the reload
    assert all(router.pick(adapter("sql")) is b for _ in range(5))
