"""`Keyring` (gateway/tenancy/keys.py), the request path's view of the API keys, on a real SQLite registry."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from gateway.registry.sqlite import SqliteStore
from gateway.registry.store import KeyRecord
from gateway.settings import ApiKey
from gateway.tenancy.keys import Keyring, open_hasher


def make(tmp_path: Path, **kw: object) -> tuple[SqliteStore, Keyring]:
    store = SqliteStore(tmp_path / "registry.sqlite3")
    return store, Keyring(open_hasher(store, None), store, **kw)  # type: ignore[arg-type]


def add(store: SqliteStore, ring: Keyring, name: str, secret: str, **kw: object) -> None:
    fields: dict[str, object] = {
        "models": ("*",),
        "limits": {},
        "expires_at": None,
        "created_at": time.time(),
    }
    fields.update(kw)
    store.create_key(KeyRecord(name, ring.hasher.hash(secret), secret[:8], **fields))  # type: ignore[arg-type]


def test_open_until_a_key_exists_and_closed_after_the_last_is_revoked(tmp_path: Path) -> None:
    store, ring = make(tmp_path)
    assert not ring.required
    add(store, ring, "a", "lgw-secret-a")
    asyncio.run(ring.refresh())
    assert ring.required and ring.lookup("lgw-secret-a").entry is not None
    assert ring.lookup("lgw-other").entry is None
    store.revoke_key("a")
    asyncio.run(ring.refresh())
    assert ring.required, "revoking every key must not open inference again"
    assert ring.lookup("lgw-secret-a").entry is None


def test_config_keys_and_require_setting(tmp_path: Path) -> None:
    _, ring = make(tmp_path, config_keys=[ApiKey(key="from-file", models=["sql*"])])  # type: ignore[arg-type]
    found = ring.lookup("from-file").entry
    assert (
        found is not None and found.name == "key-1" and found.source == "config" and found.models == ("sql*",)
    )
    _, closed = make(tmp_path / "2", require=True)
    assert closed.required, "auth.require_api_key: true closes inference with no key yet"


def test_expiry_and_rotation_grace(tmp_path: Path) -> None:
    store, ring = make(tmp_path)
    add(store, ring, "soon", "lgw-soon", expires_at=time.time() - 1)
    add(store, ring, "rot", "lgw-old")
    store.rotate_key("rot", key_hash=ring.hasher.hash("lgw-new"), prefix="lgw-new", grace_s=0.3)
    asyncio.run(ring.refresh())
    assert ring.lookup("lgw-soon").expired and ring.lookup("lgw-soon").entry is None
    assert ring.lookup("lgw-new").entry is not None and ring.lookup("lgw-old").entry is not None
    time.sleep(0.35)
    assert ring.lookup("lgw-old").entry is None, "the grace period ended"


def test_an_older_read_never_replaces_a_newer_one(tmp_path: Path) -> None:
    """A follower's refresh that read the keys before a revocation, and finishes after the admin route's
    refresh, must not bring the revoked key back."""
    store, ring = make(tmp_path)
    add(store, ring, "a", "lgw-secret-a")
    release_first = threading.Event()
    real = store.list_keys
    calls = 0

    def slow_first(**kw: object) -> list[KeyRecord]:
        nonlocal calls
        calls += 1
        rows = real(**kw)  # type: ignore[arg-type]
        if calls == 1:
            release_first.wait(5)  # read before the revocation, returned after
        return rows

    store.list_keys = slow_first  # type: ignore[method-assign]

    async def main() -> None:
        follower = asyncio.create_task(ring.refresh())
        await asyncio.sleep(0.1)
        store.revoke_key("a")
        await ring.refresh()  # the admin route's, after its write
        release_first.set()
        await follower

    asyncio.run(main())
    assert ring.lookup("lgw-secret-a").entry is None
