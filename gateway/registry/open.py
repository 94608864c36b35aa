"""`open_store(url_or_path)`: the registry backend that a URL or a path names.

    postgresql://user:secret@db:5432/lora_gateway   -> PostgresStore (also postgres://...)
    sqlite:////var/lib/lora-gateway/registry.sqlite3 -> SqliteStore at /var/lib/... (absolute: four slashes)
    sqlite:///registry.sqlite3                       -> SqliteStore at ./registry.sqlite3 (relative)
    /var/lib/lora-gateway/registry.sqlite3            -> SqliteStore (a plain path)

The `sqlite:` forms follow SQLAlchemy's convention: what follows `sqlite:///` is the path. The Postgres
backend needs the `postgres` extra (psycopg); it is imported only when a Postgres URL is opened.
"""

from __future__ import annotations

from pathlib import Path

from gateway.registry.sqlite import SqliteStore
from gateway.registry.store import RegistryStore

POSTGRES_SCHEMES = ("postgresql", "postgres")


def open_store(url_or_path: str | Path) -> RegistryStore:
    """Open (creating or migrating) the registry that `url_or_path` names. Blocks: call it in a thread."""
    if isinstance(url_or_path, Path):
        return SqliteStore(url_or_path)
    scheme, sep, rest = url_or_path.partition("://")
    if not sep:
        if not url_or_path:
            raise ValueError("empty registry path")
        return SqliteStore(url_or_path)
    scheme = scheme.lower()
    if scheme in POSTGRES_SCHEMES:
        try:
            from gateway.registry.postgres import PostgresStore
        except ImportError as exc:
            raise ImportError(
                f"A {scheme}:// registry needs psycopg: pip install 'lora-gateway[postgres]' ({exc})"
            ) from exc
        return PostgresStore(url_or_path)
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ValueError("a SQLite registry URL is sqlite:///relative/path or sqlite:////absolute/path")
        return SqliteStore(rest[1:])
    raise ValueError(f"unsupported registry URL scheme {scheme!r}: use postgresql://, sqlite:/// or a path")
