"""Both registry backends (SQLite, Postgres on a real server) against the same checks.

The core semantics are test_registry_store.py's own test bodies, run on each backend, so "behaves like
SqliteStore" means exactly what that file asserts. Then what several gateways sharing one database
need: the change token, reopening, concurrent writers in other processes, a writer dying mid-way.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

import tests.test_registry_store as sqlite_suite
from gateway.registry import postgres
from gateway.registry.open import open_store
from gateway.registry.postgres import PostgresStore
from gateway.registry.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from gateway.registry.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from gateway.registry.sqlite import SqliteStore
from gateway.registry.store import (
    RETIRED,
    RegistryError,
    RegistryNotFoundError,
    RegistryStore,
)
from tests.pg import new_database
from tests.test_registry_store import add, digest, resolve

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Backend:
    kind: type[SqliteStore] | type[PostgresStore]
    where: str  # the Postgres URL, or the SQLite file
    schema_version: int

    def open(self, kind: type[SqliteStore] | type[PostgresStore] | None = None) -> RegistryStore:
        return (kind or self.kind)(self.where)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend(SqliteStore, str(tmp_path / "data" / "registry.sqlite3"), SQLITE_SCHEMA_VERSION)
    url = new_database(request.getfixturevalue("postgres_url"))  # the server starts only for these
    return Backend(PostgresStore, url, postgres.SCHEMA_VERSION)


@pytest.fixture(name="store")
def store_fixture(backend: Backend) -> Iterator[RegistryStore]:
    s = open_store(backend.where)
    assert isinstance(s, backend.kind)
    yield s
    s.close()


CORE: list[Callable[[RegistryStore], None]] = [
    sqlite_suite.test_versions_increment_per_name,
    sqlite_suite.test_resolve,
    sqlite_suite.test_alias_overrides_newest,
    sqlite_suite.test_alias_errors,
    sqlite_suite.test_weights_split_a_name_and_retiring_drops_a_version,
    sqlite_suite.test_rollback_puts_back_the_previous_routing,
    sqlite_suite.test_evaluation_is_kept_on_the_version,
    sqlite_suite.test_pin,
    sqlite_suite.test_remove_version,
    sqlite_suite.test_remove_adapter_keeps_version_numbers,
    sqlite_suite.test_shared_digest_stays_referenced_while_one_version_is_ready,
    sqlite_suite.test_input_checks,
    sqlite_suite.test_concurrent_registrations_from_threads,  # 8 threads, one store
]


@pytest.mark.parametrize("check", CORE, ids=lambda f: f.__name__.removeprefix("test_"))
def test_core_semantics(store: RegistryStore, check: Callable[[RegistryStore], None]) -> None:
    check(store)


def test_change_token_changes_with_every_write_and_only_then(store: RegistryStore) -> None:
    tokens = [store.change_token()]

    def after(what: str, changed: bool) -> None:
        token = store.change_token()
        assert (token != tokens[-1]) == changed, what
        tokens.append(token)

    after("nothing", False)
    for what, write in [
        ("add a new name", lambda: add(store, "sql", 1)),
        ("add a version", lambda: add(store, "sql", 2, pinned=True)),
        ("set_alias", lambda: store.set_alias("sql", 1)),
        ("clear_alias", lambda: store.clear_alias("sql")),
        ("set_pinned", lambda: store.set_pinned("sql", False)),
        ("remove_version", lambda: store.remove_version("sql", 2)),
        ("remove_adapter", lambda: store.remove_adapter("sql")),
    ]:
        write()
        after(what, True)
    store.get_adapter("sql", include_removed=True)
    store.list_adapters(include_removed=True)
    store.get_version("sql", 1)
    store.referenced_digests()
    after("reads", False)
    for refused in [
        lambda: store.set_alias("sql", 1),  # every version is retired now
        lambda: store.set_pinned("sql", True),
        lambda: store.remove_version("sql", 1),
        lambda: store.remove_adapter("nope"),
        lambda: store.add_version("sql", digest="../x", source="s", rank=8, size_bytes=1),
    ]:
        with pytest.raises((RegistryNotFoundError, ValueError)):
            refused()
    after("refused writes", False)
    assert len(set(tokens)) == 8, "each write gave a token never seen before"


def test_two_stores_see_each_other(backend: Backend) -> None:
    with backend.open() as a, backend.open() as b:
        token = b.change_token()
        add(a, "sql", 1)
        assert b.change_token() != token, "a write through one store changes the token the other reads"
        assert resolve(b, "sql").digest == digest(1)
        add(b, "sql", 2)
        assert resolve(a, "sql").version == 2
        assert a.change_token() == b.change_token()


def test_everything_survives_reopening(backend: Backend) -> None:
    with backend.open() as first:
        add(first, "sql", 1, description="d", revision="a" * 40)
        add(first, "sql", 2, forced_base=True)
        add(first, "chat", 3)
        first.set_alias("sql", 1)
        first.set_pinned("chat", True)
        first.remove_adapter("chat")
        first.set_pinned("sql", True)
        before, token = first.list_adapters(include_removed=True), first.change_token()
    with backend.open() as second:
        assert second.list_adapters(include_removed=True) == before
        assert second.change_token() == token, "opening is not a change"
        assert resolve(second, "sql").version == 1 and second.get_adapter("sql").pinned
        assert second.get_version("sql", 2).forced_base and second.get_version("chat", 1).status == RETIRED
        assert second.schema_version() == backend.schema_version
        assert add(second, "chat", 4).version == 2


def test_exception_mid_transaction_rolls_back(backend: Backend) -> None:
    class Failing(backend.kind):  # type: ignore[name-defined,misc]
        def _insert_version(self, c, record):  # type: ignore[no-untyped-def]
            super()._insert_version(c, record)
            raise RuntimeError("disk on fire")

    with backend.open() as s:
        add(s, "sql", 1)
        before, token = s.list_adapters(include_removed=True), s.change_token()
    with backend.open(Failing) as failing:
        for name in ["sql", "newcomer"]:
            with pytest.raises(RuntimeError):
                add(failing, name, 2, pinned=True)
        assert failing.list_adapters(include_removed=True) == before
        assert failing.change_token() == token
    with backend.open() as s:
        assert add(s, "sql", 3).version == 2 and add(s, "newcomer", 4).version == 1


CRASHING_CHILD = textwrap.dedent(
    """
    import os, sys
    from gateway.registry.postgres import PostgresStore
    from gateway.registry.sqlite import SqliteStore

    kind = {"SqliteStore": SqliteStore, "PostgresStore": PostgresStore}[sys.argv[1]]

    class CrashMidway(kind):
        def _insert_version(self, c, record):
            super()._insert_version(c, record)  # the row is written inside the open transaction...
            os._exit(7)                         # ...and the process dies before COMMIT

    store = CrashMidway(sys.argv[2])
    store.add_version(sys.argv[3], digest="f" * 64, source="/x", rank=8, size_bytes=1, pinned=True)
    """
)


@pytest.mark.parametrize("name", ["sql", "newcomer"])
def test_a_writer_dying_mid_registration_leaves_nothing(backend: Backend, name: str) -> None:
    """A gateway killed mid-write: nothing of it stays, and the others are not left waiting on its locks."""
    with backend.open() as s:
        add(s, "sql", 1)
        before, token = s.list_adapters(include_removed=True), s.change_token()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", CRASHING_CHILD, backend.kind.__name__, backend.where, name]
    assert subprocess.run(cmd, env=env, timeout=60).returncode == 7
    with backend.open() as s:
        assert s.list_adapters(include_removed=True) == before and s.change_token() == token
        assert "f" * 64 not in s.referenced_digests()
        assert add(s, name, 9).version == (2 if name == "sql" else 1)


def test_sqlite_v1_file_is_migrated(tmp_path: Path) -> None:
    """A registry written before the change token existed: rows kept, token added."""
    db = tmp_path / "registry.sqlite3"
    conn = sqlite3.connect(db)
    for sql in SQLITE_MIGRATIONS[0][1]:
        conn.execute(sql)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (1)")
    conn.execute("INSERT INTO adapters (name, last_version, created_at, updated_at) VALUES ('sql', 1, 1, 1)")
    conn.execute(
        "INSERT INTO versions (name, version, digest, source, rank, size_bytes, status, created_at)"
        f" VALUES ('sql', 1, '{digest(1)}', '/x', 8, 1, 'ready', 1)"
    )
    conn.commit()
    conn.close()
    with SqliteStore(db) as s:
        assert s.schema_version() == SQLITE_SCHEMA_VERSION == 5
        assert resolve(s, "sql").digest == digest(1)
        token = s.change_token()
        add(s, "sql", 2)
        assert s.change_token() != token


# -- Postgres only: several gateways on one database ----------------------------------------------


@pytest.fixture
def pg_url(postgres_url: str) -> str:
    return new_database(postgres_url)


REGISTERING_CHILD = textwrap.dedent(
    """
    import sys
    from gateway.registry.postgres import PostgresStore

    url, k = sys.argv[1], int(sys.argv[2])
    with PostgresStore(url) as store:
        print("ready", flush=True)
        sys.stdin.readline()  # "go": every process starts together
        for i in range(10):
            v = store.add_version("sql", digest=f"{k * 100 + i:064x}", source=f"/p{k}", rank=8, size_bytes=1)
            print(v.version, flush=True)
    """
)


def test_processes_registering_one_name_at_once_get_consecutive_versions(pg_url: str) -> None:
    """Four gateways register `sql` (new to all of them) ten times each, all at once: versions 1..40."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTERING_CHILD, pg_url, str(k)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for k in range(4)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    seen = [[int(line) for line in out.split()] for out in outputs]
    assert sorted(v for vs in seen for v in vs) == list(range(1, 41)), "no version given twice or skipped"
    assert all(vs == sorted(vs) for vs in seen)
    with PostgresStore(pg_url) as s:
        versions = s.get_adapter("sql").versions
        assert [v.version for v in versions] == list(range(1, 41))
        assert len({v.digest for v in versions}) == 40
        for v in versions:  # each row holds what its writer was told
            k = int(v.digest, 16) // 100
            assert v.source == f"/p{k}" and v.version in seen[k]


def test_concurrent_gateways_keep_the_invariants(pg_url: str) -> None:
    """Six stores (as six gateways) add, alias, pin and remove versions of two names at random."""
    errors: list[BaseException] = []

    def gateway(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with PostgresStore(pg_url, pool_size=2) as s:
                for i in range(25):
                    name = rng.choice(["sql", "chat"])
                    op = rng.choice(["add", "add", "alias", "pin", "remove"])
                    try:
                        if op == "add":
                            add(s, name, seed * 1000 + i)
                        elif op == "alias":
                            s.set_alias(name, rng.randint(1, 12))
                        elif op == "pin":
                            s.set_pinned(name, rng.random() < 0.5)
                        else:
                            s.remove_version(name, rng.randint(1, 12))
                    except RegistryNotFoundError:
                        pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=gateway, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with PostgresStore(pg_url) as s:
        adapters = s.list_adapters(include_removed=True)
        ready_digests = set()
        for a in adapters:
            assert [v.version for v in a.versions] == list(range(1, len(a.versions) + 1))
            ready = {v.version for v in a.ready_versions}
            assert a.alias_version is None or a.alias_version in ready, "no alias on a retired version"
            assert ready or not a.pinned, "no pin without a ready version"
            ready_digests |= {v.digest for v in a.ready_versions}
        assert s.referenced_digests() == ready_digests


def test_writers_of_one_name_wait_for_each_other(pg_url: str) -> None:
    """Gateway A aliases `sql` to v2 and holds the name's lock until gateway B is seen waiting for it
    (to remove v2). B then runs after A and clears the alias: never an alias on a retired version."""
    locked, waited = threading.Event(), []

    class HoldsTheLock(PostgresStore):
        def _lock(self, c, name):  # type: ignore[no-untyped-def]
            adapter = super()._lock(c, name)
            locked.set()
            with psycopg.connect(pg_url, autocommit=True) as watcher:
                deadline = time.monotonic() + 10
                while not waited and time.monotonic() < deadline:
                    row = watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    ).fetchone()
                    if row and row[0]:
                        waited.append(True)
                    time.sleep(0.01)
            return adapter

    with PostgresStore(pg_url) as b, HoldsTheLock(pg_url) as a:
        v1, _ = add(b, "sql", 1), add(b, "sql", 2)
        aliasing = threading.Thread(target=a.set_alias, args=("sql", 2))
        aliasing.start()
        assert locked.wait(10)
        b.remove_version("sql", 2)
        aliasing.join()
        assert waited == [True], "B waited for A's lock"
        assert b.get_adapter("sql").alias_version is None and resolve(b, "sql") == v1


def test_gateways_starting_together_migrate_once(pg_url: str) -> None:
    stores: list[PostgresStore] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores.append(PostgresStore(pg_url))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert {s.schema_version() for s in stores} == {postgres.SCHEMA_VERSION}
        assert len({s.change_token() for s in stores}) == 1
    finally:
        for s in stores:
            s.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM registry_meta").fetchone() == (1,)


def test_lost_connections_are_replaced(pg_url: str) -> None:
    """The server drops every connection (a restart, a failover): the next call still works."""
    with PostgresStore(pg_url) as s:
        add(s, "sql", 1)
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        assert resolve(s, "sql").version == 1
        assert add(s, "sql", 2).version == 2


def test_newer_postgres_schema_is_refused(pg_url: str) -> None:
    PostgresStore(pg_url).close()
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(RegistryError) as info:
        PostgresStore(pg_url)
    assert info.value.code == "schema_too_new"


def test_unreachable_database_is_a_storage_error() -> None:
    with pytest.raises(RegistryError) as info:
        PostgresStore(f"postgresql://gw:hunter2@127.0.0.1:{_closed_port()}/registry", timeout_s=2)
    assert info.value.code == "storage_error"
    assert "127.0.0.1" in info.value.message and "hunter2" not in info.value.message


def _closed_port() -> int:
    from tests.conftest import free_port

    return free_port()  # bound a moment ago, now closed: connections are refused


# -- open_store ------------------------------------------------------------------------------------


def test_open_store_picks_the_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    for url in [new_database(postgres_url), "postgres://" + new_database(postgres_url).split("://")[1]]:
        with open_store(url) as s:
            assert isinstance(s, PostgresStore)
    monkeypatch.chdir(tmp_path)
    for given, path in [
        (f"sqlite:///{tmp_path}/a.sqlite3", tmp_path / "a.sqlite3"),  # sqlite:////tmp/...: absolute
        ("sqlite:///rel/b.sqlite3", tmp_path / "rel" / "b.sqlite3"),
        (str(tmp_path / "c.sqlite3"), tmp_path / "c.sqlite3"),
        (tmp_path / "d.sqlite3", tmp_path / "d.sqlite3"),
    ]:
        with open_store(given) as s:
            assert isinstance(s, SqliteStore) and s.path.resolve() == path.resolve(), given
        assert path.is_file()
    for bad in ["", "sqlite://", "sqlite:///", "mysql://db/registry"]:
        with pytest.raises(ValueError):
            open_store(bad)


def test_adapter_uses_upsert_expire_forget_and_leave_the_token(backend: Backend) -> None:
    """What gateways sharing engines publish (gateway/residency/shared.py), on both backends: a row per
    (engine, adapter, gateway), rewritten in place; rows last seen before the bound go; a gateway's clean
    stop removes its rows; none of it is a registry change (the token, which makes every gateway reload
    its catalog, stays)."""
    from gateway.registry.store import AdapterUse

    with backend.open() as s:
        token = s.change_token()
        first = [AdapterUse("e1", "x", "g1", 2, 10.0, 100.0), AdapterUse("e1", "y", "g2", 0, 5.0, 100.0)]
        s.publish_uses(first, expire_before=0.0)
        s.publish_uses([AdapterUse("e1", "x", "g1", 1, 12.0, 101.0)], expire_before=0.0)
        rows = {(u.adapter, u.gateway): (u.in_flight, u.last_used) for u in s.read_uses("e1")}
        assert rows == {("x", "g1"): (1, 12.0), ("y", "g2"): (0, 5.0)}
        assert s.read_uses("e2") == []
        s.publish_uses([AdapterUse("e2", "z", "g1", 1, 1.0, 200.0)], expire_before=100.5)  # y's row expires
        assert {u.adapter for u in s.read_uses("e1")} == {"x"}
        s.forget_uses("g1")
        assert s.read_uses("e1") == [] and s.read_uses("e2") == []
        assert s.change_token() == token
