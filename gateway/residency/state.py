"""One engine's residency state, written only by this package, and the read-only view the others read.

    EngineResidency   what is resident, in flight, draining, loaded when; recency, pins, wants,
                      retirements, loads under way; the locks and the wake-up event; lease counts
    ResidencyView     routing (`takes`, `resident_count`), `GET /admin/engines` (`describe`) and the
                      blob garbage collector (`resident`) read through it: snapshots, never the sets

The engine keeps only its own facts (`EngineStatus`: state, generation, load, probes). When what it
had loaded is gone (its process died or stopped) it says so (`Engine.state_lost`), and the
reconciliation clears what it believed (`reconcile.py`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.engines.base import Engine
from gateway.metrics import UNKNOWN
from gateway.registry.catalog import AdapterRef


@dataclass
class EngineResidency:
    """Everything residency knows about one engine; adapters by their engine-side name."""

    resident: set[str] = field(default_factory=set)  # kept equal to what vLLM lists
    in_flight: dict[str, int] = field(default_factory=dict)  # leases held now
    draining: set[str] = field(default_factory=set)  # resident, taking no new requests: evicted when idle
    last_load_at: dict[str, float] = field(default_factory=dict)  # time.time() of the last load
    lru: OrderedDict[str, None] = field(default_factory=OrderedDict)  # oldest first
    last_used: dict[str, float] = field(default_factory=dict)  # time.time() (kept when gateways share)
    known: set[str] = field(default_factory=set)  # every name this gateway loaded (only those it retires)
    wanted: dict[str, AdapterRef] = field(default_factory=dict)  # should be resident (restored on restart)
    pinned: set[str] = field(default_factory=set)
    retiring: set[str] = field(default_factory=set)  # no longer registered: unload once idle
    loading: int = 0  # loads under way: slots reserved for them
    overdue_loads: int = 0  # loads that waited `drain_after_s` for a slot: how many adapters may drain
    touched: dict[str, float] = field(default_factory=dict)  # loaded/unloaded by us: monotonic time
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # an adapter went idle, drained, left
    # Leases taken and given back, per adapter, since the gateway started: equal when nothing is in flight
    # (every lease is released exactly once); shown by /admin/engines.
    acquired: dict[str, int] = field(default_factory=dict)
    released: dict[str, int] = field(default_factory=dict)

    def lock(self, key: str) -> asyncio.Lock:
        """The adapter's own lock: its load, unload and retirement never overlap."""
        return self.locks.setdefault(key, asyncio.Lock())

    def locked(self) -> set[str]:
        """Adapters being loaded, unloaded or retired right now: neither evicted nor drained."""
        return {key for key, lock in self.locks.items() if lock.locked()}

    def label(self, key: str) -> str:
        """The metric label: the registered name; an adapter someone else loaded has none."""
        ref = self.wanted.get(key)
        return ref.name if ref else UNKNOWN

    def notify(self) -> None:
        """Wake whoever waits for a change (a slot, a drain, an adapter leaving)."""
        self.changed.set()
        self.changed = asyncio.Event()


class States:
    """Every engine's `EngineResidency`, by engine name, created on first use."""

    def __init__(self) -> None:
        self._by_engine: dict[str, EngineResidency] = {}

    def of(self, engine: Engine) -> EngineResidency:
        state = self._by_engine.get(engine.name)  # on every request: no throw-away EngineResidency
        if state is None:
            state = self._by_engine[engine.name] = EngineResidency()
        return state


class ResidencyView:
    """One engine's residency, read-only: each property is a copy taken when it is read."""

    __slots__ = ("_state",)

    def __init__(self, state: EngineResidency) -> None:
        self._state = state

    @property
    def resident(self) -> frozenset[str]:
        return frozenset(self._state.resident)

    @property
    def draining(self) -> frozenset[str]:
        return frozenset(self._state.draining)

    @property
    def in_flight(self) -> Mapping[str, int]:
        return {key: n for key, n in self._state.in_flight.items() if n}

    @property
    def last_load_at(self) -> Mapping[str, float]:
        return dict(self._state.last_load_at)

    @property
    def resident_count(self) -> int:
        return len(self._state.resident)

    def takes(self, key: str) -> bool:
        """Resident and not draining: a request for it goes to vLLM without waiting."""
        return key in self._state.resident and key not in self._state.draining

    def describe(self) -> dict[str, object]:
        """The residency fields of `GET /admin/engines`."""
        return {
            "resident_adapters": sorted(self._state.resident),
            "in_flight": dict(self.in_flight),
            "draining": sorted(self._state.draining),
            "last_load_at": self.last_load_at,
        }
