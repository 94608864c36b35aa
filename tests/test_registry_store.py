"""gateway/registry/store.py against real SQLite files: versions, resolution, aliases, pins, crashes.

What a `model` string resolves to is asked the way requests ask it: `Registry.resolve` over a snapshot
of the store (`resolve()` below)."""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.validate import AdapterRefusedError, AdapterValidationError
from gateway.registry.blobs import BlobStore
from gateway.registry.service import Registry, RegistryLimits
from gateway.registry.sqlite import SCHEMA_VERSION, SqliteStore
from gateway.registry.store import (
    READY,
    RETIRED,
    AdapterVersion,
    RegistryError,
    RegistryNotFoundError,
    RegistryStore,
    Routing,
)

REPO = Path(__file__).resolve().parents[1]
_COUNTER = itertools.count()


def digest(n: int) -> str:
    return f"{n:064x}"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "registry.sqlite3"


@pytest.fixture
def store(db: Path) -> Iterator[SqliteStore]:
    clock = itertools.count(1_700_000_000)
    s = SqliteStore(db, clock=lambda: float(next(clock)))
    yield s
    s.close()


def add(store: RegistryStore, name: str, n: int | None = None, **kw: object):
    return store.add_version(
        name,
        digest=digest(next(_COUNTER) if n is None else n),
        source=f"/adapters/{name}",
        rank=8,
        size_bytes=1234,
        **kw,  # type: ignore[arg-type]
    )


def resolve(store: RegistryStore, model: str) -> AdapterVersion | None:
    """The version `model` names on the request path: `Registry.resolve` over a fresh snapshot of `store`."""
    with tempfile.TemporaryDirectory() as blobs:
        registry = Registry(store, BlobStore(blobs), None, "tiny-llama", RegistryLimits(16, 1 << 20, ()))
        asyncio.run(registry.refresh())
        target = registry.resolve(model)
    if target is None or target.adapter is None:
        return None
    return store.get_version(target.adapter.name, target.adapter.version)


def test_sqlite_store_satisfies_the_protocol(store: SqliteStore) -> None:
    typed: RegistryStore = store
    assert typed.list_adapters() == []


def test_versions_increment_per_name(store: SqliteStore) -> None:
    v1 = add(store, "sql", 1, description="first", revision="a" * 40)
    v2 = add(store, "sql", 2)
    other = add(store, "pirate", 3)
    v3 = add(store, "sql", 4, forced_base=True)
    assert [v1.version, v2.version, v3.version, other.version] == [1, 2, 3, 1]
    assert (v1.description, v1.revision, v1.status, v1.model_id) == ("first", "a" * 40, READY, "sql@1")
    assert store.get_version("sql", 3) == v3 and v3.forced_base
    adapter = store.get_adapter("sql")
    assert adapter is not None and [v.version for v in adapter.versions] == [1, 2, 3]
    assert adapter.current == v3 and not adapter.pinned
    assert [a.name for a in store.list_adapters()] == ["pirate", "sql"]


def test_resolve(store: SqliteStore) -> None:
    v1, v2 = add(store, "sql", 1), add(store, "sql", 2)
    assert resolve(store, "sql") == v2
    assert resolve(store, "sql@1") == v1
    assert resolve(store, "sql@2") == v2
    unknown = ["sql@3", "sql@0", "sql@01", "sql@", "sql@x", "sql@-1", "sql@1@2", "sql@١", "nope", "nope@1"]
    # `sql@١`: a non-ASCII digit; `tiny-llama`: the base, no adapter
    for model in [*unknown, "", "@1", "a/b", "tiny-llama"]:
        assert resolve(store, model) is None, model


def test_alias_overrides_newest(store: SqliteStore) -> None:
    v1, _ = add(store, "sql", 1), add(store, "sql", 2)
    assert store.set_alias("sql", 1).alias_version == 1
    assert resolve(store, "sql") == v1
    v3 = add(store, "sql", 3)
    assert resolve(store, "sql") == v1, "a new version does not move an alias"
    assert resolve(store, "sql@3") == v3
    assert store.clear_alias("sql").alias_version is None
    assert resolve(store, "sql") == v3


def test_alias_errors(store: SqliteStore) -> None:
    add(store, "sql", 1)
    with pytest.raises(RegistryNotFoundError) as info:
        store.set_alias("sql", 7)
    assert info.value.code == "version_not_found"
    with pytest.raises(RegistryNotFoundError) as info:
        store.set_alias("nope", 1)
    assert info.value.code == "adapter_not_found"
    add(store, "sql", 2)
    store.remove_version("sql", 1)
    with pytest.raises(RegistryNotFoundError):
        store.set_alias("sql", 1)


def _split_shares(store: RegistryStore, model: str, users: int = 2000) -> dict[int, float]:
    """How `Registry.resolve` shares `users` distinct end users between the versions of `model`."""
    with tempfile.TemporaryDirectory() as blobs:
        registry = Registry(store, BlobStore(blobs), None, "tiny-llama", RegistryLimits(16, 1 << 20, ()))
        asyncio.run(registry.refresh())
        counts: dict[int, int] = {}
        for i in range(users):
            target = registry.resolve(model, f"user-{i}")
            assert target is not None and target.adapter is not None
            counts[target.adapter.version] = counts.get(target.adapter.version, 0) + 1
            again = registry.resolve(model, f"user-{i}")
            assert again is not None and again.adapter == target.adapter, "the same user, another version"
    return {v: n / users for v, n in counts.items()}


def test_weights_split_a_name_and_retiring_drops_a_version(store: SqliteStore) -> None:
    for n in (1, 2, 3):
        add(store, "sql", n)
    a = store.set_routing("sql", Routing(weights={1: 90, 2: 10}))
    assert a.weights == {1: 90, 2: 10} and a.current is not None and a.current.version == 1
    shares = _split_shares(store, "sql")
    assert set(shares) == {1, 2} and abs(shares[2] - 0.10) < 0.03, shares
    assert resolve(store, "sql@3").version == 3, "a pinned version is not split"
    store.remove_version("sql", 2)
    assert store.get_adapter("sql").weights is None, "one live version left: no split"
    assert resolve(store, "sql").version == 1, "the remaining weighted version serves"
    for bad in ({}, {1: -1}, {1: 0}, {7: 10}, {1: 10**7}, dict.fromkeys(range(1, 10), 1)):
        with pytest.raises(AdapterRefusedError) as info:
            store.set_routing("sql", Routing(weights=bad))
        assert info.value.code in {"invalid_weights", "version_not_found"}, bad
    assert store.get_adapter("sql").alias_weights == {1: 90, 2: 10}, "refused writes change nothing"


def test_rollback_puts_back_the_previous_routing(store: SqliteStore) -> None:
    add(store, "sql", 1)
    add(store, "sql", 2)
    with pytest.raises(AdapterRefusedError) as info:
        store.rollback("sql")
    assert info.value.code == "nothing_to_roll_back"
    store.set_alias("sql", 1)
    store.set_routing("sql", Routing(weights={1: 50, 2: 50}))
    a = store.set_alias("sql", 2)  # promoted
    assert a.previous_routing == Routing(None, {1: 50, 2: 50})
    a = store.rollback("sql")
    assert a.alias_version is None and a.weights == {1: 50, 2: 50}
    assert store.rollback("sql").alias_version == 2, "a second rollback undoes the first"
    store.remove_version("sql", 1)
    with pytest.raises(RegistryNotFoundError):
        store.rollback("sql")  # its previous routing names a retired version


def test_evaluation_is_kept_on_the_version(store: SqliteStore) -> None:
    add(store, "sql", 1)
    scores = {"metric": "exact_match", "score": 0.5, "compared": {"base": {"exact_match": 0.1}}}
    v = store.set_evaluation("sql", 1, scores)
    assert v.evaluation == scores
    assert store.get_adapter("sql").versions[0].evaluation == scores
    with pytest.raises(RegistryNotFoundError):
        store.set_evaluation("sql", 9, scores)


def test_pin(store: SqliteStore) -> None:
    add(store, "sql", 1)
    assert store.set_pinned("sql", True).pinned
    add(store, "sql", 2)
    assert store.get_adapter("sql").pinned, "pin belongs to the adapter, not a version"
    assert not store.set_pinned("sql", False).pinned
    assert add(store, "chat", 3, pinned=True) and store.get_adapter("chat").pinned
    with pytest.raises(RegistryNotFoundError):
        store.set_pinned("nope", True)


def test_remove_version(store: SqliteStore) -> None:
    v1, _ = add(store, "sql", 1), add(store, "sql", 2)
    store.set_alias("sql", 2)
    removed = store.remove_version("sql", 2)
    assert removed.version == 2 and removed.status == READY  # as it was
    assert store.get_version("sql", 2).status == RETIRED
    assert resolve(store, "sql@2") is None
    assert resolve(store, "sql") == v1, "alias on a retired version is cleared"
    assert store.get_adapter("sql").alias_version is None
    assert store.referenced_digests() == {digest(1)}
    with pytest.raises(RegistryNotFoundError):
        store.remove_version("sql", 2)


def test_remove_adapter_keeps_version_numbers(store: SqliteStore) -> None:
    add(store, "sql", 1)
    add(store, "sql", 2)
    add(store, "chat", 3)
    store.set_pinned("sql", True)
    removed = store.remove_adapter("sql")
    assert [v.version for v in removed] == [1, 2]
    assert (
        store.get_adapter("sql") is None and resolve(store, "sql") is None and resolve(store, "sql@1") is None
    )
    assert [a.name for a in store.list_adapters()] == ["chat"]
    gone = store.get_adapter("sql", include_removed=True)
    assert gone is not None and not gone.pinned and {v.status for v in gone.versions} == {RETIRED}
    assert store.referenced_digests() == {digest(3)}
    with pytest.raises(RegistryNotFoundError):
        store.remove_adapter("sql")
    assert add(store, "sql", 1).version == 3, "version numbers are never reused"
    assert store.referenced_digests() == {digest(1), digest(3)}


def test_shared_digest_stays_referenced_while_one_version_is_ready(store: SqliteStore) -> None:
    add(store, "a", 42)
    add(store, "b", 42)
    store.remove_adapter("a")
    assert store.referenced_digests() == {digest(42)}
    store.remove_adapter("b")
    assert store.referenced_digests() == set()


def test_input_checks(store: SqliteStore) -> None:
    with pytest.raises(AdapterValidationError):
        add(store, "bad@name", 1)
    with pytest.raises(ValueError, match="digest"):
        store.add_version("sql", digest="../x", source="s", rank=8, size_bytes=1)
    assert store.list_adapters(include_removed=True) == []


def test_everything_survives_reopening(db: Path) -> None:
    with SqliteStore(db) as first:
        add(first, "sql", 1, description="d")
        add(first, "sql", 2)
        add(first, "chat", 3)
        first.set_alias("sql", 1)
        first.set_pinned("chat", True)
        first.remove_adapter("chat")
        first.set_pinned("sql", True)
        before = first.list_adapters(include_removed=True)
    with SqliteStore(db) as second:
        assert second.list_adapters(include_removed=True) == before
        assert resolve(second, "sql").version == 1 and second.get_adapter("sql").pinned
        assert second.schema_version() == SCHEMA_VERSION
        assert add(second, "chat", 4).version == 2
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_two_connections_see_each_other(db: Path) -> None:
    with SqliteStore(db) as a, SqliteStore(db) as b:
        add(a, "sql", 1)
        assert resolve(b, "sql").digest == digest(1)
        add(b, "sql", 2)
        assert resolve(a, "sql").version == 2


CRASHING_CHILD = textwrap.dedent(
    """
    import os, sys
    from gateway.registry.sqlite import SqliteStore

    class CrashMidway(SqliteStore):
        def _insert_version(self, c, record):
            super()._insert_version(c, record)  # the row is written inside the open transaction...
            os._exit(7)                         # ...and the process dies before COMMIT

    store = CrashMidway(sys.argv[1])
    store.add_version(sys.argv[2], digest="f" * 64, source="/x", rank=8, size_bytes=1, pinned=True)
    """
)


@pytest.mark.parametrize("name", ["sql", "newcomer"])
def test_crash_during_registration_leaves_the_old_state(db: Path, name: str) -> None:
    with SqliteStore(db) as store:
        add(store, "sql", 1)
        store.set_alias("sql", 1)
        before = store.list_adapters(include_removed=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CRASHING_CHILD, str(db), name], env=env, timeout=60)
    assert proc.returncode == 7
    with SqliteStore(db) as store:
        assert store.list_adapters(include_removed=True) == before
        assert store.get_version(name, 2 if name == "sql" else 1) is None
        assert "f" * 64 not in store.referenced_digests()
        assert add(store, name, 9).version == (2 if name == "sql" else 1)


def test_exception_mid_transaction_rolls_back(db: Path) -> None:
    class Failing(SqliteStore):
        def _insert_version(self, c, record):  # type: ignore[no-untyped-def]
            super()._insert_version(c, record)
            raise RuntimeError("disk on fire")

    with Failing(db) as store:
        with pytest.raises(RuntimeError):
            add(store, "sql", 1, pinned=True)
        assert store.list_adapters(include_removed=True) == []
    with SqliteStore(db) as store:
        assert add(store, "sql", 1).version == 1


def test_newer_schema_is_refused(db: Path) -> None:
    SqliteStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError) as info:
        SqliteStore(db)
    assert info.value.code == "schema_too_new"


def test_concurrent_registrations_from_threads(store: SqliteStore) -> None:
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(10):
                add(store, "sql", 1000 + k * 10 + i)
                store.list_adapters()  # what each refresh of a registry reads
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    versions = [v.version for v in store.get_adapter("sql").versions]
    assert versions == list(range(1, 81))
    assert len({v.digest for v in store.get_adapter("sql").versions}) == 80


def test_seeding_registers_new_and_changed_folders_once_and_skips_bad_ones(tmp_path: Path) -> None:
    """A start reads adapters_dir: new folders are registered (one snapshot rebuild for all of them), an
    unchanged one is not registered again, a changed one gets a version, a bad one is skipped."""
    import json as _json

    from adapters.validate import BaseModelSpec
    from tests.test_sources import adapter_files
    from tests.test_validate import BASE_CONFIG

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(_json.dumps(BASE_CONFIG))
    base = BaseModelSpec.from_model_dir(tmp_path / "base", "tiny-llama")
    folder = tmp_path / "adapters"

    def write(name: str, files: dict[str, bytes]) -> None:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for file, data in files.items():
            (folder / name / file).write_bytes(data)

    for name in ("a", "b", "c"):
        write(name, adapter_files())
    write("bad", {"adapter_config.json": b"{}"})
    store = SqliteStore(tmp_path / "registry.sqlite3")
    try:
        limits = RegistryLimits(16, 1 << 20, (folder.absolute(),))
        registry = Registry(store, BlobStore(tmp_path / "blobs"), base, "tiny-llama", limits)
        refreshes = 0
        refresh = registry.refresh

        async def counted() -> None:
            nonlocal refreshes
            refreshes += 1
            await refresh()

        registry.refresh = counted  # type: ignore[method-assign]
        assert asyncio.run(registry.seed(folder)) == ["a", "b", "c"]
        assert refreshes == 1 and {r.name for r in registry.adapters()} == {"a", "b", "c"}
        assert asyncio.run(registry.seed(folder)) == [] and refreshes == 1, "unchanged: nothing written"
        write("b", adapter_files(r=4))  # retrained
        assert asyncio.run(registry.seed(folder)) == ["b"]
        assert [v.version for v in registry.adapter("b").versions] == [1, 2]  # type: ignore[union-attr]
    finally:
        store.close()
