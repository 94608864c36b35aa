"""The tenants' tables on both registry backends (real SQLite, real PostgreSQL): API keys and usage.

Key writes move the change token (other gateways re-read the keys: that is how a revocation reaches them);
usage writes do not (they are not registry changes). Usage rows add up, also from several writers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.registry.open import open_store
from gateway.registry.store import (
    KeyExistsError,
    KeyRecord,
    RegistryError,
    RegistryNotFoundError,
    RegistryStore,
    UsageRow,
)
from gateway.tenancy.keys import open_hasher
from tests.test_registry_store_backends import Backend, backend  # noqa: F401  (the parametrized fixture)


@pytest.fixture(name="store")
def store_fixture(backend: Backend) -> Iterator[RegistryStore]:  # noqa: F811
    s = open_store(backend.where)
    yield s
    s.close()


def record(name: str, key_hash: str = "h1", **kw: object) -> KeyRecord:
    fields: dict[str, object] = {
        "name": name,
        "key_hash": key_hash,
        "prefix": "lgw-abcd",
        "models": ("sql*",),
        "limits": {"requests_per_minute": 10},
        "expires_at": None,
        "created_at": time.time(),
    }
    fields.update(kw)
    return KeyRecord(**fields)  # type: ignore[arg-type]


def test_keys_create_list_update_rotate_revoke(store: RegistryStore) -> None:
    token = store.change_token()
    store.create_key(record("team-a"))
    assert store.change_token() != token, "a key write is a registry change: other gateways re-read keys"
    [got] = store.list_keys()
    assert got.name == "team-a" and got.models == ("sql*",) and got.limits == {"requests_per_minute": 10}
    with pytest.raises(KeyExistsError) as info:
        store.create_key(record("team-a", "h2"))
    assert info.value.code == "key_exists"

    updated = store.update_key("team-a", limits={"max_concurrent": 2}, models=["a", "b"])
    assert (
        updated.limits == {"max_concurrent": 2} and updated.models == ("a", "b") and updated.key_hash == "h1"
    )
    with pytest.raises(ValueError):
        store.update_key("team-a", key_hash="stolen")

    rotated = store.rotate_key("team-a", key_hash="h3", prefix="lgw-new1", grace_s=60)
    assert rotated.key_hash == "h3" and rotated.previous_hash == "h1"
    assert rotated.previous_until is not None and rotated.previous_until > time.time() + 50
    now = store.rotate_key("team-a", key_hash="h4", prefix="lgw-new2", grace_s=0)
    assert now.previous_hash is None and now.previous_until is None

    token = store.change_token()
    revoked = store.revoke_key("team-a")
    assert revoked.revoked_at is not None and store.change_token() != token
    assert store.list_keys() == [] and [k.name for k in store.list_keys(include_revoked=True)] == ["team-a"]
    for call in (
        lambda: store.revoke_key("team-a"),
        lambda: store.rotate_key("team-a", key_hash="x", prefix="x", grace_s=0),
        lambda: store.update_key("team-a", models=["x"]),
        lambda: store.revoke_key("nobody"),
    ):
        with pytest.raises(RegistryNotFoundError) as nf:
            call()
        assert nf.value.code == "key_not_found"
    # A revoked name may be used again (a new secret, a new row).
    store.create_key(record("team-a", "h5"))
    assert [k.key_hash for k in store.list_keys()] == ["h5"]


def test_refused_key_writes_leave_the_token(store: RegistryStore) -> None:
    store.create_key(record("team-a"))
    token = store.change_token()
    with pytest.raises(KeyExistsError):
        store.create_key(record("team-a"))
    with pytest.raises(RegistryNotFoundError):
        store.revoke_key("nobody")
    assert store.change_token() == token


def test_usage_adds_up_and_filters(store: RegistryStore) -> None:
    token = store.change_token()
    h0, h1 = 3600 * 1000, 3600 * 1001
    store.add_usage([UsageRow("a", "sql", 2, h0, 1, 10, 5), UsageRow("b", "tiny", 0, h0, 1, 3, 3)])
    store.add_usage([UsageRow("a", "sql", 2, h0, 2, 20, 10), UsageRow("a", "sql", 2, h1, 1, 1, 1)])
    assert store.change_token() == token, "usage is not a registry change"
    rows = store.read_usage(key="a")
    assert [(r.hour, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        (h0, 3, 30, 15),
        (h1, 1, 1, 1),
    ]
    assert [r.key for r in store.read_usage(model="tiny")] == ["b"]
    assert [r.hour for r in store.read_usage(since=h1)] == [h1]
    assert len(store.read_usage(until=h1)) == 2
    assert store.read_usage(key="nobody") == []


def test_usage_from_concurrent_writers_is_not_lost(backend: Backend) -> None:  # noqa: F811
    """Several gateways (here threads, each with its own store) add to the same rows at once."""
    stores = [open_store(backend.where) for _ in range(4)]
    try:

        def write(s: RegistryStore) -> None:
            for _ in range(25):
                s.add_usage([UsageRow("a", "sql", 1, 0, 1, 2, 3)])

        threads = [threading.Thread(target=write, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        [row] = stores[0].read_usage()
        assert (row.requests, row.prompt_tokens, row.completion_tokens) == (100, 200, 300)
    finally:
        for s in stores:
            s.close()


def test_gateways_agree_on_the_hashing_secret(backend: Backend) -> None:  # noqa: F811
    first, second = open_store(backend.where), open_store(backend.where)
    try:
        # Unset everywhere: the first gateway stores a random secret, the second uses the same one.
        assert open_hasher(first, None).hash("k") == open_hasher(second, None).hash("k")
        # A configured secret that is not the one the keys were hashed with: refused, not every key.
        with pytest.raises(RegistryError) as info:
            open_hasher(second, "another secret")
        assert info.value.code == "key_secret_mismatch"
    finally:
        first.close()
        second.close()


def test_a_failed_usage_write_is_kept_for_the_next(tmp_path: Path) -> None:
    """The recorder's store fails once (a database briefly away): nothing counted is lost."""
    import asyncio

    from gateway.registry.sqlite import SqliteStore
    from gateway.tenancy.usage import UsageRecorder

    store = SqliteStore(tmp_path / "registry.sqlite3")
    real, failures = store.add_usage, [RuntimeError("database is away")]

    def flaky(rows):  # noqa: ANN001, ANN202
        if failures:
            raise failures.pop()
        return real(rows)

    store.add_usage = flaky  # type: ignore[method-assign]
    recorder = UsageRecorder(store, clock=lambda: 7200.0)

    async def main() -> None:
        recorder.add("a", "sql", 1, 10, 5)
        with pytest.raises(RuntimeError):
            await recorder.flush()
        recorder.add("a", "sql", 1, 1, 1)
        await recorder.close()

    asyncio.run(main())
    [row] = store.read_usage()
    assert (row.hour, row.requests, row.prompt_tokens, row.completion_tokens) == (7200, 2, 11, 6)
