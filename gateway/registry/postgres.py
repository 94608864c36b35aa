"""`RegistryStore` in PostgreSQL, for several gateways sharing one registry (`store.py` has the semantics).

    PostgresStore("postgresql://user:secret@db:5432/lora_gateway")

The same tables as SQLite's (`adapters`, `versions`, `registry_meta`, `schema_version`, `adapter_uses`,
`api_keys`, `usage`, `registry_settings`), created or
migrated on open under a transaction-level advisory lock, so gateways starting together migrate once.
Give the registry its own database (or its own schema: `?options=-csearch_path%3Dlora_gateway`).
Needs PostgreSQL 13 or newer and `psycopg` 3 with `psycopg_pool` (the `postgres` extra).

Concurrency:
- Threads: a small `psycopg_pool.ConnectionPool` (`pool_size`, default 4). Each call borrows one
  connection for one transaction, so reads run side by side and a slow call blocks no other. A borrowed
  connection is checked first, so one broken by a database restart is replaced, not handed out.
- Processes (other gateways): every write is one READ COMMITTED transaction that first locks its
  adapter's row: `add_version` through `INSERT ... ON CONFLICT (name) DO UPDATE SET last_version =
  last_version + 1 RETURNING last_version` (a new name too: the second inserter waits for the first to
  commit, then increments), the others through `SELECT ... FOR UPDATE`. Writers of one name therefore
  run one after another and read what the previous one committed: two gateways registering `sql` at
  once get versions N and N+1. The `registry_meta` counter is bumped last, just before COMMIT (so
  locks are always taken in the order adapter row, then counter: no deadlock), and becomes visible
  with the rows it counts. A gateway that dies mid-transaction leaves nothing: the server rolls back.
- Reads of more than one statement (`get_adapter`, `list_adapters`) run in one REPEATABLE READ, READ
  ONLY transaction, so an adapter and its versions come from one snapshot.

Database errors after opening are psycopg's own (`psycopg.OperationalError`, ...), as SQLite's are
`sqlite3`'s; failing to open is a `RegistryError` with code `storage_error`. All methods block.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

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

Conn = psycopg.Connection[dict[str, Any]]

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE adapters (
                name TEXT PRIMARY KEY,
                pinned BOOLEAN NOT NULL DEFAULT FALSE,
                alias_version INTEGER,
                last_version INTEGER NOT NULL DEFAULT 0,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE versions (
                name TEXT NOT NULL REFERENCES adapters (name),
                version INTEGER NOT NULL CHECK (version >= 1),
                digest TEXT NOT NULL,
                source TEXT NOT NULL,
                revision TEXT,
                description TEXT NOT NULL DEFAULT '',
                rank INTEGER NOT NULL,
                size_bytes BIGINT NOT NULL,
                forced_base BOOLEAN NOT NULL DEFAULT FALSE,
                status TEXT NOT NULL CHECK (status IN ('ready', 'retired')),
                created_at DOUBLE PRECISION NOT NULL,
                retired_at DOUBLE PRECISION,
                PRIMARY KEY (name, version)
            )""",
            "CREATE INDEX versions_by_digest ON versions (digest)",
            """CREATE TABLE registry_meta (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                instance TEXT NOT NULL,
                changes BIGINT NOT NULL
            )""",
            "INSERT INTO registry_meta (id, instance, changes) VALUES (1, gen_random_uuid()::text, 0)",
        ],
    ),
    (
        2,
        [
            """CREATE TABLE adapter_uses (
                engine TEXT NOT NULL,
                adapter TEXT NOT NULL,
                gateway TEXT NOT NULL,
                in_flight INTEGER NOT NULL,
                last_used DOUBLE PRECISION NOT NULL,
                seen_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (engine, adapter, gateway)
            )""",
        ],
    ),
    (
        3,
        [
            """CREATE TABLE api_keys (
                name TEXT PRIMARY KEY,
                key_hash TEXT NOT NULL,
                prefix TEXT NOT NULL,
                models TEXT NOT NULL,
                limits TEXT NOT NULL,
                expires_at DOUBLE PRECISION,
                created_at DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION,
                rotated_at DOUBLE PRECISION,
                previous_hash TEXT,
                previous_until DOUBLE PRECISION
            )""",
            """CREATE TABLE usage (
                key TEXT NOT NULL,
                model TEXT NOT NULL,
                version INTEGER NOT NULL,
                hour BIGINT NOT NULL,
                requests BIGINT NOT NULL,
                prompt_tokens BIGINT NOT NULL,
                completion_tokens BIGINT NOT NULL,
                PRIMARY KEY (key, model, version, hour)
            )""",
            "CREATE INDEX usage_by_hour ON usage (hour)",
            "CREATE TABLE registry_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ],
    ),
    (
        4,
        [
            "ALTER TABLE adapters ADD COLUMN alias_weights TEXT",
            "ALTER TABLE adapters ADD COLUMN previous_routing TEXT",
            "ALTER TABLE versions ADD COLUMN evaluation TEXT",
        ],
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
_MIGRATION_LOCK = 0x6C6F_7261_2D67_7701  # b"lora-gw\x01": pg_advisory_xact_lock's key while migrating


class PostgresStore:
    """`RegistryStore` in a PostgreSQL database. Thread-safe (a connection pool); shared by processes."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        pool_size: int = 4,
        timeout_s: float = 10.0,
    ) -> None:
        self.where = describe_url(url)  # for messages: no user name, no password
        self._clock = clock
        connect_timeout = max(2, round(timeout_s))
        try:  # alone first: a clear error if unreachable
            with psycopg.connect(
                url, autocommit=True, row_factory=dict_row, connect_timeout=connect_timeout
            ) as conn:
                self._migrate(conn)
        except psycopg.Error as exc:  # unreachable, no such database, refused login, no privilege
            raise RegistryError(f"Cannot open the registry at {self.where}: {exc}", "storage_error") from exc
        self._pool: ConnectionPool[Conn] = ConnectionPool(
            url,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": connect_timeout},
            min_size=1,
            max_size=pool_size,
            timeout=timeout_s,
            check=ConnectionPool.check_connection,
            name="lora-gateway-registry",
            open=True,
        )
        try:
            self._pool.wait(timeout=timeout_s)
        except PoolTimeout as exc:
            self._pool.close()
            raise RegistryError(f"Cannot open the registry at {self.where}: {exc}", "storage_error") from exc

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[Conn]:
        """One write transaction; bumps the change counter last, just before COMMIT."""
        with self._pool.connection() as conn, conn.transaction():
            yield conn
            conn.execute("UPDATE registry_meta SET changes = changes + 1")

    @contextmanager
    def _snapshot(self) -> Iterator[Conn]:
        """One read-only transaction whose statements all see the same committed state."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield conn

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """A single-statement read (a statement is its own snapshot)."""
        with self._pool.connection() as conn:
            return conn.execute(sql, params).fetchall()

    def _migrate(self, conn: Conn) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            current = row["version"] if row else 0
            if current > SCHEMA_VERSION:
                raise RegistryError(
                    f"{self.where} has schema v{current}; this gateway knows up to v{SCHEMA_VERSION}.",
                    "schema_too_new",
                )
            for version, statements in MIGRATIONS:
                if version > current:
                    for sql in statements:
                        conn.execute(sql)
                    conn.execute("UPDATE schema_version SET version = %s", (version,))

    def schema_version(self) -> int:
        return int(self._one("SELECT version FROM schema_version")[0]["version"])

    def change_token(self) -> str:
        """Changes with every committed write, by any gateway (see `store.py`'s module doc)."""
        row = self._one("SELECT instance, changes FROM registry_meta")[0]
        return f"{row['instance']}:{row['changes']}"

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
        with self._write() as c:
            row = c.execute(
                "INSERT INTO adapters AS a (name, last_version, created_at, updated_at)"
                " VALUES (%s, 1, %s, %s) ON CONFLICT (name)"
                " DO UPDATE SET last_version = a.last_version + 1, updated_at = %s"
                " RETURNING last_version",
                (name, now, now, now),
            ).fetchone()
            assert row is not None
            record = AdapterVersion(
                name=name, version=row["last_version"], digest=digest, source=source, revision=revision,
                description=description, rank=rank, size_bytes=size_bytes, forced_base=forced_base,
                status=READY, created_at=now,
            )  # fmt: skip
            self._insert_version(c, record)
            if pinned is not None:
                c.execute("UPDATE adapters SET pinned = %s WHERE name = %s", (pinned, name))
            return record

    def _insert_version(self, c: Conn, v: AdapterVersion) -> None:
        c.execute(
            "INSERT INTO versions (name, version, digest, source, revision, description, rank, size_bytes,"
            " forced_base, status, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (v.name, v.version, v.digest, v.source, v.revision, v.description, v.rank, v.size_bytes,
             v.forced_base, v.status, v.created_at),
        )  # fmt: skip

    def set_alias(self, name: str, version: int) -> Adapter:
        """Make `name` resolve to `version` (which must be ready) instead of the newest version."""
        return self.set_routing(name, Routing(version))

    def clear_alias(self, name: str) -> Adapter:
        return self.set_routing(name, Routing())

    def set_routing(self, name: str, routing: Routing) -> Adapter:
        """One version, weights over versions, or the newest (`Routing()`); the old routing is kept."""
        with self._write() as c:
            c.execute(routing_sql("%s"), routing_values(self._lock(c, name), routing, self._clock()))
            return require_listed(self._load(c, name), name)

    def rollback(self, name: str) -> Adapter:
        """Put back the routing the last change replaced."""
        with self._write() as c:
            c.execute(routing_sql("%s"), rollback_values(self._lock(c, name), self._clock()))
            return require_listed(self._load(c, name), name)

    def set_evaluation(self, name: str, version: int, evaluation: Mapping[str, Any]) -> AdapterVersion:
        with self._write() as c:
            require_ready(self._lock(c, name), version)
            c.execute(evaluation_sql("%s"), (json.dumps(dict(evaluation)), name, version))
            return require_ready(require_listed(self._load(c, name), name), version)

    def set_pinned(self, name: str, pinned: bool) -> Adapter:
        with self._write() as c:
            self._lock(c, name)
            c.execute(
                "UPDATE adapters SET pinned = %s, updated_at = %s WHERE name = %s",
                (pinned, self._clock(), name),
            )
            return require_listed(self._load(c, name), name)

    def remove_version(self, name: str, version: int) -> AdapterVersion:
        """Retire one ready version; returns it as it was."""
        with self._write() as c:
            record = require_ready(self._lock(c, name), version)
            self._retire(c, name, [version])
            return record

    def remove_adapter(self, name: str) -> list[AdapterVersion]:
        """Retire every ready version of `name`; returns them as they were."""
        with self._write() as c:
            ready = list(self._lock(c, name).ready_versions)
            self._retire(c, name, [v.version for v in ready])
            return ready

    def _retire(self, c: Conn, name: str, versions: list[int]) -> None:
        now = self._clock()
        c.execute(
            "UPDATE versions SET status = 'retired', retired_at = %s WHERE name = %s AND version = ANY(%s)",
            (now, name, versions),
        )
        # An alias stays only while its version is ready, a pin only while some version is.
        c.execute(
            "UPDATE adapters AS a SET updated_at = %(now)s,"
            " alias_version = CASE WHEN EXISTS (SELECT 1 FROM versions v WHERE v.name = a.name"
            "     AND v.version = a.alias_version AND v.status = 'ready') THEN a.alias_version END,"
            " pinned = a.pinned AND EXISTS (SELECT 1 FROM versions v WHERE v.name = a.name"
            "     AND v.status = 'ready')"
            " WHERE a.name = %(name)s",
            {"now": now, "name": name},
        )

    # -- reads ---------------------------------------------------------------------------------

    def get_adapter(self, name: str, *, include_removed: bool = False) -> Adapter | None:
        with self._snapshot() as c:
            adapter = self._load(c, name)
        if adapter is None or (not include_removed and not adapter.ready_versions):
            return None
        return adapter

    def list_adapters(self, *, include_removed: bool = False) -> list[Adapter]:
        """Adapters sorted by name; without `include_removed`, only those with a ready version."""
        with self._snapshot() as c:
            rows = c.execute("SELECT * FROM adapters ORDER BY name").fetchall()
            vrows = c.execute("SELECT * FROM versions ORDER BY name, version").fetchall()
        versions: dict[str, list[AdapterVersion]] = {}
        for vrow in vrows:
            versions.setdefault(vrow["name"], []).append(version_from_row(vrow))
        adapters = [adapter_from_row(row, versions.get(row["name"], [])) for row in rows]
        return [a for a in adapters if include_removed or a.ready_versions]

    def get_version(self, name: str, version: int) -> AdapterVersion | None:
        """One version whatever its status (check `.status`); None if it never existed."""
        rows = self._one("SELECT * FROM versions WHERE name = %s AND version = %s", (name, version))
        return version_from_row(rows[0]) if rows else None

    def referenced_digests(self) -> set[str]:
        """Digests of ready versions: blobs outside this set may be garbage-collected."""
        return {r["digest"] for r in self._one("SELECT DISTINCT digest FROM versions WHERE status = 'ready'")}

    # -- helpers -------------------------------------------------------------------------------

    # -- what the gateways use (not registry changes: the token stays) -------------------------

    def publish_uses(self, uses: Sequence[AdapterUse], *, expire_before: float) -> None:
        """Write this gateway's rows; drop anyone's rows last seen before `expire_before`."""
        with self._pool.connection() as conn, conn.transaction():
            with conn.cursor() as cur:
                cur.executemany(upsert_uses_sql("%s"), use_rows(uses))
            conn.execute("DELETE FROM adapter_uses WHERE seen_at < %s", (expire_before,))

    def read_uses(self, engine: str) -> list[AdapterUse]:
        return [AdapterUse(**r) for r in self._one("SELECT * FROM adapter_uses WHERE engine = %s", (engine,))]

    def forget_uses(self, gateway: str) -> None:
        with self._pool.connection() as conn:
            conn.execute("DELETE FROM adapter_uses WHERE gateway = %s", (gateway,))

    # -- API keys (registry changes: the counter moves) and usage (not: it stays) -------------------

    def create_key(self, record: KeyRecord) -> KeyRecord:
        """A new key; a revoked key's name may be reused (its row is replaced), a live one's not."""
        columns = ", ".join(KEY_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in KEY_COLUMNS[1:])
        marks = ", ".join(["%s"] * len(KEY_COLUMNS))
        with self._write() as c:
            row = c.execute(
                f"INSERT INTO api_keys ({columns}) VALUES ({marks})"
                f" ON CONFLICT (name) DO UPDATE SET {updates}"
                " WHERE api_keys.revoked_at IS NOT NULL RETURNING name",
                key_row(record),
            ).fetchone()
            if row is None:
                raise KeyExistsError(f"An API key named {record.name!r} exists.", "key_exists", "name")
        return record

    def update_key(self, name: str, **fields: Any) -> KeyRecord:
        values = key_update_values(fields)
        with self._write() as c:
            self._live_key(c, name, lock=True)
            if values:
                sets = ", ".join(f"{column} = %s" for column in values)
                c.execute(f"UPDATE api_keys SET {sets} WHERE name = %s", (*values.values(), name))
            return self._live_key(c, name)

    def rotate_key(self, name: str, *, key_hash: str, prefix: str, grace_s: float) -> KeyRecord:
        """A new secret; the old one stays valid `grace_s` more seconds (0: not at all)."""
        now = self._clock()
        with self._write() as c:
            old = self._live_key(c, name, lock=True)
            c.execute(rotate_sql("%s"), rotate_values(old, key_hash, prefix, now, grace_s))
            return self._live_key(c, name)

    def revoke_key(self, name: str) -> KeyRecord:
        with self._write() as c:
            self._live_key(c, name, lock=True)
            row = c.execute(
                "UPDATE api_keys SET revoked_at = %s WHERE name = %s RETURNING *", (self._clock(), name)
            ).fetchone()
            assert row is not None
            return key_from_row(row)

    def list_keys(self, *, include_revoked: bool = False) -> list[KeyRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        return [key_from_row(r) for r in self._one(f"SELECT * FROM api_keys{where} ORDER BY name")]

    def add_usage(self, rows: Sequence[UsageRow]) -> None:
        if rows:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                cur.executemany(usage_sql("%s"), usage_rows(rows))

    def read_usage(
        self,
        *,
        key: str | None = None,
        model: str | None = None,
        since: int | None = None,
        until: int | None = None,
    ) -> list[UsageRow]:
        sql, params = usage_query("%s", key, model, since, until)
        return [UsageRow(**r) for r in self._one(sql, tuple(params))]

    def setting(self, name: str, default: str) -> str:
        """The value stored under `name`; the first caller stores `default` (later ones read it)."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO registry_settings (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (name, default),
            )
            row = conn.execute("SELECT value FROM registry_settings WHERE name = %s", (name,)).fetchone()
            assert row is not None
            return str(row["value"])

    def _live_key(self, c: Conn, name: str, *, lock: bool = False) -> KeyRecord:
        row = c.execute(
            "SELECT * FROM api_keys WHERE name = %s AND revoked_at IS NULL" + (" FOR UPDATE" if lock else ""),
            (name,),
        ).fetchone()
        if row is None:
            raise key_not_found(name)
        return key_from_row(row)

    def _load(self, c: Conn, name: str, *, lock: bool = False) -> Adapter | None:
        row = c.execute(
            "SELECT * FROM adapters WHERE name = %s" + (" FOR UPDATE" if lock else ""), (name,)
        ).fetchone()
        if row is None:
            return None
        vrows = c.execute("SELECT * FROM versions WHERE name = %s ORDER BY version", (name,)).fetchall()
        return adapter_from_row(row, [version_from_row(v) for v in vrows])

    def _lock(self, c: Conn, name: str) -> Adapter:
        """Lock `name`'s row until COMMIT (its other writers wait), then read it as committed."""
        return require_listed(self._load(c, name, lock=True), name)


def describe_url(url: str) -> str:
    """`postgresql://host:port/dbname`, without the user name and password a URL may carry."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{params.get('host', '')}{port}/{params.get('dbname', '')}"
