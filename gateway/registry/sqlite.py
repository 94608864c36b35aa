"""`SqliteStore`: the registry's `RegistryStore` (gateway/registry/store.py) in one SQLite file.

`SqliteStore` keeps one file in WAL mode (`synchronous=FULL`, foreign keys on) and creates or migrates
the schema on open (table `schema_version`). It holds one connection opened with
`check_same_thread=False`; a lock serializes every call, and every change runs in one
`BEGIN IMMEDIATE` transaction, so a crash leaves the old state or the new. Other processes may open
the same file (they wait up to `busy_timeout_s`). All methods block: call them through a thread.
`open_store()` (in `open.py`) picks the backend from a URL or a path.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.registry.store import (
    KEY_COLUMNS,
    READY,
    Adapter,
    AdapterUse,
    AdapterVersion,
    KeyExistsError,
    KeyRecord,
    RegistryError,
    Routing,
    UsageRow,
    adapter_from_row,
    check_new_version,
    evaluation_sql,
    key_from_row,
    key_not_found,
    key_row,
    key_update_values,
    require_listed,
    require_ready,
    rollback_values,
    rotate_sql,
    rotate_values,
    routing_sql,
    routing_values,
    upsert_uses_sql,
    usage_query,
    usage_rows,
    usage_sql,
    use_rows,
    version_from_row,
)

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE adapters (
                name TEXT PRIMARY KEY,
                pinned INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1)),
                alias_version INTEGER,
                last_version INTEGER NOT NULL DEFAULT 0,
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL
            )""",
            """CREATE TABLE versions (
                name TEXT NOT NULL REFERENCES adapters (name),
                version INTEGER NOT NULL CHECK (version >= 1),
                digest TEXT NOT NULL,
                source TEXT NOT NULL,
                revision TEXT,
                description TEXT NOT NULL DEFAULT '',
                rank INTEGER NOT NULL,
                size_bytes INTEGER NOT NULL,
                forced_base INTEGER NOT NULL DEFAULT 0 CHECK (forced_base IN (0, 1)),
                status TEXT NOT NULL CHECK (status IN ('ready', 'retired')),
                created_at REAL NOT NULL,
                retired_at REAL,
                PRIMARY KEY (name, version)
            )""",
            "CREATE INDEX versions_by_digest ON versions (digest)",
        ],
    ),
    (
        2,
        [
            """CREATE TABLE registry_meta (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                instance TEXT NOT NULL,
                changes INTEGER NOT NULL
            )""",
            "INSERT INTO registry_meta (id, instance, changes) VALUES (1, lower(hex(randomblob(16))), 0)",
        ],
    ),
    (
        3,
        [
            """CREATE TABLE adapter_uses (
                engine TEXT NOT NULL,
                adapter TEXT NOT NULL,
                gateway TEXT NOT NULL,
                in_flight INTEGER NOT NULL,
                last_used REAL NOT NULL,
                seen_at REAL NOT NULL,
                PRIMARY KEY (engine, adapter, gateway)
            )""",
        ],
    ),
    (
        4,
        [
            """CREATE TABLE api_keys (
                name TEXT PRIMARY KEY,
                key_hash TEXT NOT NULL,
                prefix TEXT NOT NULL,
                models TEXT NOT NULL,
                limits TEXT NOT NULL,
                expires_at REAL,
                created_at REAL NOT NULL,
                revoked_at REAL,
                rotated_at REAL,
                previous_hash TEXT,
                previous_until REAL
            )""",
            """CREATE TABLE usage (
                key TEXT NOT NULL,
                model TEXT NOT NULL,
                version INTEGER NOT NULL,
                hour INTEGER NOT NULL,
                requests INTEGER NOT NULL,
                prompt_tokens INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                PRIMARY KEY (key, model, version, hour)
            )""",
            "CREATE INDEX usage_by_hour ON usage (hour)",
            "CREATE TABLE registry_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ],
    ),
    (
        5,
        [
            "ALTER TABLE adapters ADD COLUMN alias_weights TEXT",
            "ALTER TABLE adapters ADD COLUMN previous_routing TEXT",
            "ALTER TABLE versions ADD COLUMN evaluation TEXT",
        ],
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


class SqliteStore:
    """`RegistryStore` in one SQLite file. Thread-safe (one connection, one lock)."""

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 5.0,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RegistryError(f"{self.path}: WAL mode unavailable ({mode})", "storage_error")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, *, write: bool = True, counted: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; a write (unless not `counted`) bumps the change counter before COMMIT."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._conn
                if write and counted:
                    self._conn.execute("UPDATE registry_meta SET changes = changes + 1")
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _synchronous(self, level: str) -> Iterator[None]:
        self._conn.execute(f"PRAGMA synchronous={level}")
        try:
            yield
        finally:
            self._conn.execute("PRAGMA synchronous=FULL")

    def _migrate(self) -> None:
        with self._tx(counted=False) as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = c.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                c.execute("INSERT INTO schema_version (version) VALUES (0)")
            current = row[0] if row else 0
            if current > SCHEMA_VERSION:
                raise RegistryError(
                    f"{self.path} has schema v{current}; this gateway knows up to v{SCHEMA_VERSION}.",
                    "schema_too_new",
                )
            for version, statements in MIGRATIONS:
                if version > current:
                    for sql in statements:
                        c.execute(sql)
                    c.execute("UPDATE schema_version SET version = ?", (version,))

    def schema_version(self) -> int:
        with self._tx(write=False) as c:
            return int(c.execute("SELECT version FROM schema_version").fetchone()[0])

    def change_token(self) -> str:
        """Changes with every committed write, by this or any other connection (see the module doc)."""
        with self._tx(write=False) as c:
            instance, changes = c.execute("SELECT instance, changes FROM registry_meta").fetchone()
        return f"{instance}:{changes}"

    # -- writes --------------------------------------------------------------------------------

    def add_version(
        self,
        name: str,
        *,
        digest: str,
        source: str,
        rank: int,
        size_bytes: int,
        revision: str | None = None,
        description: str = "",
        forced_base: bool = False,
        pinned: bool | None = None,
    ) -> AdapterVersion:
        """Record a new version of `name` (creating the adapter); `pinned` None keeps the pin as is."""
        check_new_version(name, digest)
        now = self._clock()
        with self._tx() as c:
            row = c.execute("SELECT last_version FROM adapters WHERE name = ?", (name,)).fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO adapters (name, created_at, updated_at) VALUES (?, ?, ?)", (name, now, now)
                )
            version = (row[0] if row else 0) + 1
            record = AdapterVersion(
                name=name, version=version, digest=digest, source=source, revision=revision,
                description=description, rank=rank, size_bytes=size_bytes, forced_base=forced_base,
                status=READY, created_at=now,
            )  # fmt: skip
            self._insert_version(c, record)
            c.execute(
                "UPDATE adapters SET last_version = ?, updated_at = ? WHERE name = ?", (version, now, name)
            )
            if pinned is not None:
                c.execute("UPDATE adapters SET pinned = ? WHERE name = ?", (int(pinned), name))
            return record

    def _insert_version(self, c: sqlite3.Connection, v: AdapterVersion) -> None:
        c.execute(
            "INSERT INTO versions (name, version, digest, source, revision, description, rank, size_bytes,"
            " forced_base, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (v.name, v.version, v.digest, v.source, v.revision, v.description, v.rank, v.size_bytes,
             int(v.forced_base), v.status, v.created_at),
        )  # fmt: skip

    def set_alias(self, name: str, version: int) -> Adapter:
        """Make `name` resolve to `version` (which must be ready) instead of the newest version."""
        return self.set_routing(name, Routing(version))

    def clear_alias(self, name: str) -> Adapter:
        return self.set_routing(name, Routing())

    def set_routing(self, name: str, routing: Routing) -> Adapter:
        """One version, weights over versions, or the newest (`Routing()`); the old routing is kept."""
        with self._tx() as c:
            c.execute(
                routing_sql("?"), routing_values(self._require_adapter(c, name), routing, self._clock())
            )
            return self._require_adapter(c, name)

    def rollback(self, name: str) -> Adapter:
        """Put back the routing the last change replaced."""
        with self._tx() as c:
            c.execute(routing_sql("?"), rollback_values(self._require_adapter(c, name), self._clock()))
            return self._require_adapter(c, name)

    def set_evaluation(self, name: str, version: int, evaluation: Mapping[str, Any]) -> AdapterVersion:
        with self._tx() as c:
            self._require_ready(c, name, version)
            c.execute(evaluation_sql("?"), (json.dumps(dict(evaluation)), name, version))
            return self._require_ready(c, name, version)

    def set_pinned(self, name: str, pinned: bool) -> Adapter:
        with self._tx() as c:
            self._require_adapter(c, name)
            c.execute(
                "UPDATE adapters SET pinned = ?, updated_at = ? WHERE name = ?",
                (int(pinned), self._clock(), name),
            )
            return self._require_adapter(c, name)

    def remove_version(self, name: str, version: int) -> AdapterVersion:
        """Retire one ready version; returns it as it was."""
        with self._tx() as c:
            record = self._require_ready(c, name, version)
            self._retire(c, name, [version])
            return record

    def remove_adapter(self, name: str) -> list[AdapterVersion]:
        """Retire every ready version of `name`; returns them as they were."""
        with self._tx() as c:
            adapter = self._require_adapter(c, name)
            ready = list(adapter.ready_versions)
            self._retire(c, name, [v.version for v in ready])
            return ready

    def _retire(self, c: sqlite3.Connection, name: str, versions: list[int]) -> None:
        now = self._clock()
        c.executemany(
            "UPDATE versions SET status = 'retired', retired_at = ? WHERE name = ? AND version = ?",
            [(now, name, v) for v in versions],
        )
        c.execute(
            "UPDATE adapters SET alias_version = NULL WHERE name = ? AND alias_version IN"
            " (SELECT version FROM versions WHERE name = ? AND status = 'retired')",
            (name, name),
        )
        left = c.execute("SELECT 1 FROM versions WHERE name = ? AND status = 'ready'", (name,)).fetchone()
        if left is None:
            c.execute("UPDATE adapters SET pinned = 0, alias_version = NULL WHERE name = ?", (name,))
        c.execute("UPDATE adapters SET updated_at = ? WHERE name = ?", (now, name))

    # -- reads ---------------------------------------------------------------------------------

    def get_adapter(self, name: str, *, include_removed: bool = False) -> Adapter | None:
        with self._tx(write=False) as c:
            adapter = self._load(c, name)
        if adapter is None or (not include_removed and not adapter.ready_versions):
            return None
        return adapter

    def list_adapters(self, *, include_removed: bool = False) -> list[Adapter]:
        """Adapters sorted by name; without `include_removed`, only those with a ready version."""
        with self._tx(write=False) as c:
            rows = c.execute("SELECT * FROM adapters ORDER BY name").fetchall()
            versions: dict[str, list[AdapterVersion]] = {}
            for vrow in c.execute("SELECT * FROM versions ORDER BY name, version"):
                versions.setdefault(vrow["name"], []).append(version_from_row(vrow))
        adapters = [adapter_from_row(row, versions.get(row["name"], [])) for row in rows]
        return [a for a in adapters if include_removed or a.ready_versions]

    def get_version(self, name: str, version: int) -> AdapterVersion | None:
        """One version whatever its status (check `.status`); None if it never existed."""
        with self._tx(write=False) as c:
            row = c.execute(
                "SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)
            ).fetchone()
        return version_from_row(row) if row else None

    def referenced_digests(self) -> set[str]:
        """Digests of ready versions: blobs outside this set may be garbage-collected."""
        with self._tx(write=False) as c:
            return {r[0] for r in c.execute("SELECT DISTINCT digest FROM versions WHERE status = 'ready'")}

    # -- what the gateways use (not registry changes: the token stays) -------------------------

    def publish_uses(self, uses: Sequence[AdapterUse], *, expire_before: float) -> None:
        """Write this gateway's rows; drop anyone's rows last seen before `expire_before`. Not history: no
        fsync per batch (a crash loses at most the last batches, which their gateway's restart makes moot)."""
        with self._lock, self._synchronous("NORMAL"), self._tx(counted=False) as c:
            c.executemany(upsert_uses_sql("?"), use_rows(uses))
            c.execute("DELETE FROM adapter_uses WHERE seen_at < ?", (expire_before,))

    def read_uses(self, engine: str) -> list[AdapterUse]:
        with self._tx(write=False) as c:
            rows = c.execute("SELECT * FROM adapter_uses WHERE engine = ?", (engine,)).fetchall()
        return [AdapterUse(**dict(r)) for r in rows]

    def forget_uses(self, gateway: str) -> None:
        with self._tx(counted=False) as c:
            c.execute("DELETE FROM adapter_uses WHERE gateway = ?", (gateway,))

    # -- API keys (registry changes: the token moves) and usage (not: the token stays) ----------

    def create_key(self, record: KeyRecord) -> KeyRecord:
        """A new key; a revoked key's name may be reused (its row is replaced), a live one's not."""
        with self._tx() as c:
            row = c.execute("SELECT revoked_at FROM api_keys WHERE name = ?", (record.name,)).fetchone()
            if row is not None and row["revoked_at"] is None:
                raise KeyExistsError(f"An API key named {record.name!r} exists.", "key_exists", "name")
            marks = ", ".join("?" * len(KEY_COLUMNS))
            c.execute(
                f"INSERT OR REPLACE INTO api_keys ({', '.join(KEY_COLUMNS)}) VALUES ({marks})",
                key_row(record),
            )
        return record

    def update_key(self, name: str, **fields: Any) -> KeyRecord:
        values = key_update_values(fields)
        with self._tx() as c:
            self._live_key(c, name)
            if values:
                sets = ", ".join(f"{column} = ?" for column in values)
                c.execute(f"UPDATE api_keys SET {sets} WHERE name = ?", (*values.values(), name))
            return self._live_key(c, name)

    def rotate_key(self, name: str, *, key_hash: str, prefix: str, grace_s: float) -> KeyRecord:
        """A new secret; the old one stays valid `grace_s` more seconds (0: not at all)."""
        now = self._clock()
        with self._tx() as c:
            old = self._live_key(c, name)
            c.execute(rotate_sql("?"), rotate_values(old, key_hash, prefix, now, grace_s))
            return self._live_key(c, name)

    def revoke_key(self, name: str) -> KeyRecord:
        with self._tx() as c:
            self._live_key(c, name)
            c.execute("UPDATE api_keys SET revoked_at = ? WHERE name = ?", (self._clock(), name))
            return key_from_row(c.execute("SELECT * FROM api_keys WHERE name = ?", (name,)).fetchone())

    def list_keys(self, *, include_revoked: bool = False) -> list[KeyRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        with self._tx(write=False) as c:
            rows = c.execute(f"SELECT * FROM api_keys{where} ORDER BY name").fetchall()
        return [key_from_row(r) for r in rows]

    def add_usage(self, rows: Sequence[UsageRow]) -> None:
        if rows:
            with self._tx(counted=False) as c:
                c.executemany(usage_sql("?"), usage_rows(rows))

    def read_usage(
        self,
        *,
        key: str | None = None,
        model: str | None = None,
        since: int | None = None,
        until: int | None = None,
    ) -> list[UsageRow]:
        sql, params = usage_query("?", key, model, since, until)
        with self._tx(write=False) as c:
            return [UsageRow(**dict(r)) for r in c.execute(sql, params).fetchall()]

    def setting(self, name: str, default: str) -> str:
        """The value stored under `name`; the first caller stores `default` (later ones read it)."""
        with self._tx(counted=False) as c:
            c.execute("INSERT OR IGNORE INTO registry_settings (name, value) VALUES (?, ?)", (name, default))
            return str(c.execute("SELECT value FROM registry_settings WHERE name = ?", (name,)).fetchone()[0])

    # -- helpers -------------------------------------------------------------------------------

    def _live_key(self, c: sqlite3.Connection, name: str) -> KeyRecord:
        row = c.execute("SELECT * FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone()
        if row is None:
            raise key_not_found(name)
        return key_from_row(row)

    def _load(self, c: sqlite3.Connection, name: str) -> Adapter | None:
        row = c.execute("SELECT * FROM adapters WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        vrows = c.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()
        return adapter_from_row(row, [version_from_row(v) for v in vrows])

    def _require_adapter(self, c: sqlite3.Connection, name: str) -> Adapter:
        return require_listed(self._load(c, name), name)

    def _require_ready(self, c: sqlite3.Connection, name: str, version: int) -> AdapterVersion:
        return require_ready(self._require_adapter(c, name), version)
