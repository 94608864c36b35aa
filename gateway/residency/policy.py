"""Residency's decisions, as pure functions of one engine's state: no asyncio, no I/O, unit-tested
(tests/test_residency_policy.py) like `gateway/routing.py`.

    age order        resident adapters, least recently used first; those of unknown age (loaded by
                     someone else, or before a restart) before all, by name
    evict            the first idle one in age order: no request in flight, not pinned, not locked
    shared age       several gateways on one engine: age is the last use by any of them, in flight
                     is the sum of theirs (`shared.py` publishes and reads them)
    drain            none idle: the busy ones with the fewest requests in flight (then the oldest),
                     never pinned or locked, one per overdue load, never more
    lift drains      a load stopped waiting: the drains no overdue load needs any more, busiest first
    believe          a probe's listing is the truth, except for adapters this gateway loaded or
                     unloaded after the listing was asked for (they keep their state)
    restore order    what should be resident and is not: pinned first, then the most recently used;
                     past `restore_limit` resident, only pinned ones

Adapters are named by their engine-side name; `lru` is ordered oldest first.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Set


def by_age(resident: Set[str], lru: Collection[str]) -> list[str]:
    """Resident adapters, least recently used first (those of unknown age, by name, before all)."""
    return sorted(k for k in resident if k not in lru) + [k for k in lru if k in resident]


def by_last_use(resident: Set[str], mine: Mapping[str, float], others: Mapping[str, float]) -> list[str]:
    """Resident adapters by their last use on any gateway, oldest first; those no gateway has used (loaded
    before a restart, or by someone outside the registry), by name, before all."""
    last = {k: max(mine.get(k, 0.0), others.get(k, 0.0)) for k in resident if k in mine or k in others}
    return sorted(k for k in resident if k not in last) + sorted(last, key=lambda k: (last[k], k))


def add_counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    """Requests in flight here plus elsewhere, per adapter."""
    total = dict(a)
    for key, n in b.items():
        total[key] = total.get(key, 0) + n
    return total


def eviction_candidate(
    resident: Set[str],
    lru: Collection[str],
    in_flight: Mapping[str, int],
    pinned: Set[str],
    locked: Set[str],
) -> str | None:
    """The adapter to unload to make room, or None when every one is busy, pinned or locked."""
    for key in by_age(resident, lru):
        if in_flight.get(key, 0) == 0 and key not in pinned and key not in locked:
            return key
    return None


def to_drain(
    resident: Set[str],
    lru: Collection[str],
    in_flight: Mapping[str, int],
    draining: Set[str],
    pinned: Set[str],
    locked: Set[str],
    overdue_loads: int,
) -> list[str]:
    """The busy adapters that start draining now, so that each overdue load gets a slot: as many as
    overdue loads not yet covered by a drain, the fewest requests in flight first, then the oldest."""
    wanted = overdue_loads - len(draining)
    if wanted <= 0:
        return []
    ordered = by_age(resident, lru)
    age = {key: i for i, key in enumerate(ordered)}
    candidates = [k for k in ordered if k not in draining and k not in pinned and k not in locked]
    candidates.sort(key=lambda k: (in_flight.get(k, 0), age[k]))
    return candidates[:wanted]


def drains_to_lift(draining: Set[str], in_flight: Mapping[str, int], overdue_loads: int) -> list[str]:
    """The drains beyond what the overdue loads need: the busiest first (their requests go on)."""
    excess = len(draining) - overdue_loads
    if excess <= 0:
        return []
    return sorted(draining, key=lambda k: (-in_flight.get(k, 0), k))[:excess]


def believed_resident(
    resident: Set[str], listed: Set[str], touched: Mapping[str, float], listing_started_at: float
) -> tuple[set[str], set[str]]:
    """What to believe resident after a probe, and what vLLM lost (it restarted, or someone unloaded it).

    `touched`: when this gateway last loaded or unloaded each adapter (the clock of `listing_started_at`);
    a listing asked for before that change may predate it, so those adapters keep the state we gave them
    (without this, a stale listing dropped adapters with requests in flight and brought back ones just
    evicted)."""
    changed = {key for key, at in touched.items() if at >= listing_started_at}
    lost = set(resident) - listed - changed
    return (set(listed) - changed) | (set(resident) & changed), lost


def restore_order(missing: Iterable[str], pinned: Set[str], lru: Collection[str]) -> list[str]:
    """Adapters to load again, in order: pinned first, then the most recently used (`lru` as it was
    before the lost ones left it); those of unknown age last, in the order given."""
    recency = {key: i for i, key in enumerate(lru)}
    return sorted(missing, key=lambda k: (k not in pinned, -recency.get(k, -1)))


def may_restore(key: str, resident_count: int, restore_limit: int, pinned: Set[str]) -> bool:
    """Pinned adapters always come back; the others while fewer than `restore_limit` are resident (what
    vLLM keeps in memory: the rest load on their next request)."""
    return key in pinned or resident_count < restore_limit
