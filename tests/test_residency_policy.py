"""Residency's decisions (gateway/residency/policy.py), as pure functions: plain sets and dicts in, names out.

How they play together under concurrent requests, and against a fake vLLM, is tests/test_residency.py.
"""

from __future__ import annotations

import random

from gateway.residency import policy

NONE: frozenset[str] = frozenset()


def test_age_order_puts_adapters_of_unknown_age_first_by_name() -> None:
    resident = {"b", "a", "foreign-z", "foreign-y"}
    lru = ["a", "gone", "b"]  # oldest first; "gone" is no longer resident
    assert policy.by_age(resident, lru) == ["foreign-y", "foreign-z", "a", "b"]


def test_eviction_takes_the_oldest_idle_unpinned_unlocked_adapter() -> None:
    resident, lru = {"a", "b", "c", "d"}, ["a", "b", "c", "d"]
    assert policy.eviction_candidate(resident, lru, {}, NONE, NONE) == "a"
    assert policy.eviction_candidate(resident, lru, {"a": 1}, NONE, NONE) == "b", "busy: kept"
    assert policy.eviction_candidate(resident, lru, {"a": 1}, {"b"}, NONE) == "c", "pinned: kept"
    assert policy.eviction_candidate(resident, lru, {"a": 1}, {"b"}, {"c"}) == "d", "being loaded: kept"
    assert policy.eviction_candidate(resident, lru, {"a": 1, "d": 2}, {"b"}, {"c"}) is None


def test_a_drain_takes_the_fewest_requests_in_flight_then_the_oldest() -> None:
    resident, lru = {"a", "b", "c"}, ["a", "b", "c"]
    in_flight = {"a": 3, "b": 1, "c": 1}
    assert policy.to_drain(resident, lru, in_flight, NONE, NONE, NONE, overdue_loads=1) == ["b"]
    assert policy.to_drain(resident, lru, in_flight, NONE, NONE, NONE, overdue_loads=2) == ["b", "c"]
    assert policy.to_drain(resident, lru, in_flight, {"b"}, NONE, NONE, overdue_loads=2) == ["c"]


def test_one_drain_per_overdue_load_never_more_and_never_pinned_or_locked() -> None:
    resident, lru, in_flight = {"a", "b", "c"}, ["a", "b", "c"], {"a": 1, "b": 2, "c": 3}
    assert policy.to_drain(resident, lru, in_flight, NONE, NONE, NONE, overdue_loads=0) == []
    assert policy.to_drain(resident, lru, in_flight, {"c"}, NONE, NONE, overdue_loads=1) == [], "covered"
    assert policy.to_drain(resident, lru, in_flight, NONE, {"a"}, {"b"}, overdue_loads=1) == ["c"]
    assert policy.to_drain(resident, lru, in_flight, NONE, {"a", "b", "c"}, NONE, overdue_loads=2) == []


def test_drains_no_load_needs_are_lifted_the_busiest_first() -> None:
    in_flight = {"a": 1, "b": 4, "c": 2}
    assert policy.drains_to_lift({"a", "b", "c"}, in_flight, overdue_loads=3) == []
    assert policy.drains_to_lift({"a", "b", "c"}, in_flight, overdue_loads=1) == ["b", "c"]
    assert policy.drains_to_lift({"a", "b"}, in_flight, overdue_loads=0) == ["b", "a"]
    assert policy.drains_to_lift({"x", "y"}, {}, overdue_loads=1) == ["x"], "ties: by name"


def test_the_listing_is_believed_except_for_what_changed_after_it_was_asked_for() -> None:
    asked_at = 100.0
    resident = {"kept", "lost", "loaded-after"}
    listed = {"kept", "foreign", "unloaded-after"}
    touched = {"loaded-after": 101.0, "unloaded-after": 102.0, "kept": 99.0}
    believed, lost = policy.believed_resident(resident, listed, touched, asked_at)
    assert believed == {"kept", "foreign", "loaded-after"}
    assert lost == {"lost"}, "vLLM no longer has it: it restarted, or someone else unloaded it"


def test_a_listing_after_every_change_is_the_whole_truth() -> None:
    believed, lost = policy.believed_resident({"a", "b"}, {"b", "c"}, {"a": 1.0, "b": 2.0}, 5.0)
    assert (believed, lost) == ({"b", "c"}, {"a"})


def test_restore_order_is_pinned_first_then_most_recent_then_unknown_age() -> None:
    lru = ["old", "pinned", "mid", "new"]  # as it was before the lost ones left it
    missing = ["never-used-1", "old", "new", "pinned", "mid", "never-used-2"]
    order = policy.restore_order(missing, {"pinned"}, lru)
    assert order == ["pinned", "new", "mid", "old", "never-used-1", "never-used-2"]


def test_past_the_restore_limit_only_pinned_adapters_come_back() -> None:
    assert policy.may_restore("a", resident_count=1, restore_limit=2, pinned=NONE)
    assert not policy.may_restore("a", resident_count=2, restore_limit=2, pinned=NONE)
    assert policy.may_restore("p", resident_count=5, restore_limit=2, pinned={"p"})


def test_no_decision_ever_touches_a_busy_pinned_or_locked_adapter_it_must_not() -> None:
    """Random states: eviction only of idle, unpinned, unlocked residents; drains only of unpinned,
    unlocked residents, never more than the overdue loads; lifting leaves exactly what they need."""
    rng = random.Random(0)
    names = [f"a{i}" for i in range(8)]
    for _ in range(2000):
        resident = {n for n in names if rng.random() < 0.7}
        lru = rng.sample(names, rng.randint(0, len(names)))
        in_flight = {n: rng.choice([0, 0, 1, 3]) for n in resident}
        pinned = {n for n in names if rng.random() < 0.2}
        locked = {n for n in names if rng.random() < 0.1}
        draining = {n for n in resident if rng.random() < 0.2}
        overdue = rng.randint(0, 3)
        victim = policy.eviction_candidate(resident, lru, in_flight, pinned, locked)
        if victim is not None:
            assert victim in resident and not in_flight[victim] and victim not in pinned | locked
        else:
            assert all(in_flight[n] or n in pinned | locked for n in resident)
        drained = policy.to_drain(resident, lru, in_flight, draining, pinned, locked, overdue)
        assert set(drained) <= resident - draining - pinned - locked
        assert len(drained) == len(set(drained)) <= max(0, overdue - len(draining))
        lifted = policy.drains_to_lift(draining, in_flight, overdue)
        assert set(lifted) <= draining and len(draining) - len(lifted) == min(len(draining), overdue)
