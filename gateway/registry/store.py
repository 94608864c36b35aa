"""The registry's durable state, behind `RegistryStore`: SQLite here, Postgres in `postgres.py`.

    adapter  name, pinned, alias_version, alias_weights, previous_routing, last_version
      └── version 1, 2, 3, ...   per name, increasing, never reused (not even after removal)
            digest, source, revision, description, rank, size_bytes, forced_base,
            status ("ready" | "retired"), created_at, evaluation

`name` resolves to the alias's version when one is set, else to the newest ready version; `name@3`
resolves to version 3 while it is ready. With `alias_weights` ({3: 90, 4: 10}, a canary) `name` is split
between those versions per request (the registry picks, sticky per end user: gateway/registry/split.py);
a retired version drops out of the split. Every routing change (`set_routing`) keeps the routing it
replaced in `previous_routing`, which `rollback` restores (and a second rollback undoes the first).
`evaluation` holds the held-out scores `lora-gateway adapters promote --eval` measured for a version.

Removing retires: rows stay as history, but only ready versions count as references to a blob
(`referenced_digests()`), and an adapter without ready versions is neither listed nor resolvable (its
pin and alias are cleared).

`change_token()` is a cheap string that changes with every committed write (a counter in the one-row
table `registry_meta`, bumped inside each write's transaction, plus a random id of the database), so
gateways sharing one database notice each other's writes by polling it: read the token first, then
the snapshot. Reads and refused writes leave it as it is.

The records (`Adapter`, `AdapterVersion`), the interface (`RegistryStore`) and the checks every backend
makes live here; the backends are `sqlite.py` (one file, the default) and `postgres.py` (several gateways
sharing one database). `open_store()` (in `open.py`) picks the backend from a URL or a path.

Beside the records, one table that is not history: `adapter_uses`, what each gateway sharing the
registry is using on each engine (`AdapterUse`: requests in flight, last use, when it said so), written
by `gateway/residency/shared.py` in batches and read before evicting. Its writes do not change the
token (they are not registry changes).

The tenants' side (gateway/tenancy/): `api_keys` (`KeyRecord`: a key's name, the keyed hash of its
secret, never the secret, its models, limits and expiry; revoked rows stay, so a name's history stays
readable; rotation keeps the previous hash until its grace period ends), `usage` (`UsageRow`: requests
and tokens per key x model x version x hour, added to in batches) and `registry_settings` (named values
the gateways sharing the registry must agree on, such as the check of the key-hashing secret). Key writes
change the token (every gateway then re-reads the keys: a revocation reaches them all within
`registry.poll_interval_s`); usage writes do not.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from adapters.validate import AdapterRefusedError, validate_adapter_name

READY = "ready"
RETIRED = "retired"
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


class RegistryError(Exception):
    """The registry's storage cannot be used (opening it): `storage_error`, `schema_too_new`."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class RegistryNotFoundError(AdapterRefusedError, LookupError):
    """No such adapter, or no such ready version: `adapter_not_found`, `version_not_found`."""


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: int
    digest: str
    source: str
    revision: str | None
    description: str
    rank: int
    size_bytes: int
    forced_base: bool
    status: str
    created_at: float
    evaluation: dict[str, Any] | None = None  # held-out scores (`adapters promote --eval`)

    @property
    def model_id(self) -> str:
        """The pinned model string, `name@version`."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Routing:
    """Where `name` sends requests: one version (an alias), weights over versions (a canary), or, with
    neither, the newest ready version."""

    version: int | None = None
    weights: dict[int, int] | None = None

    def describe(self) -> dict[str, Any]:
        weights = {str(k): v for k, v in self.weights.items()} if self.weights else None
        return {"version": self.version, "weights": weights}


@dataclass(frozen=True)
class Adapter:
    name: str
    pinned: bool
    alias_version: int | None
    versions: tuple[AdapterVersion, ...]  # every version, oldest first, retired ones included
    created_at: float
    updated_at: float
    alias_weights: dict[int, int] | None = None  # a canary: version -> weight
    previous_routing: Routing | None = None  # what the last routing change replaced (for rollback)

    @property
    def routing(self) -> Routing:
        return Routing(self.alias_version, self.alias_weights)

    @property
    def weights(self) -> dict[int, int] | None:
        """The canary's weights over ready versions (retired ones dropped), None unless two or more
        versions have a positive weight."""
        ready = {v.version for v in self.ready_versions}
        live = {v: w for v, w in self._positive_weights.items() if v in ready}
        return live if len(live) >= 2 else None

    @property
    def _positive_weights(self) -> dict[int, int]:
        return {v: w for v, w in sorted((self.alias_weights or {}).items()) if w > 0}

    @property
    def ready_versions(self) -> tuple[AdapterVersion, ...]:
        return tuple(v for v in self.versions if v.status == READY)

    @property
    def current(self) -> AdapterVersion | None:
        """What `name` resolves to: the alias's version, else the newest ready one. During a canary, the
        version with the largest weight (the older on a tie): the one listings and pins treat as `name`."""
        ready = self.ready_versions
        weights = self.weights or self._positive_weights
        if weights:
            best = max(weights, key=weights.__getitem__)  # sorted: the older on a tie
            for v in ready:
                if v.version == best:
                    return v
        for v in ready:
            if v.version == self.alias_version:
                return v
        return ready[-1] if ready else None


@dataclass(frozen=True)
class AdapterUse:
    """One gateway's use of one adapter (engine-side name) on one engine, as it last published it."""

    engine: str  # the engine's base URL: the same engine has the same key in every gateway
    adapter: str
    gateway: str
    in_flight: int
    last_used: float  # time.time() of the last request that leased it
    seen_at: float  # time.time() when the gateway wrote this row


@dataclass(frozen=True)
class KeyRecord:
    """One inference API key as stored: the keyed hash of its secret (gateway/tenancy/keys.py), never it."""

    name: str
    key_hash: str  # hex HMAC-SHA256 of the secret
    prefix: str  # the secret's first characters, to tell keys apart in listings
    models: tuple[str, ...]  # names or globs it may call
    limits: dict[str, int]  # KeyLimits' set fields
    expires_at: float | None
    created_at: float
    revoked_at: float | None = None
    rotated_at: float | None = None
    previous_hash: str | None = None  # the secret before the last rotation, valid until previous_until
    previous_until: float | None = None


@dataclass(frozen=True)
class UsageRow:
    """What one key spent on one model (adapter version; 0: the base model) in one hour (epoch seconds)."""

    key: str  # the key's name; "" when inference is open
    model: str  # the adapter's name, or the base model's
    version: int
    hour: int
    requests: int
    prompt_tokens: int
    completion_tokens: int


class RegistryStore(Protocol):
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
    ) -> AdapterVersion: ...
    def get_adapter(self, name: str, *, include_removed: bool = False) -> Adapter | None: ...
    def list_adapters(self, *, include_removed: bool = False) -> list[Adapter]: ...
    def get_version(self, name: str, version: int) -> AdapterVersion | None: ...
    def set_alias(self, name: str, version: int) -> Adapter: ...
    def clear_alias(self, name: str) -> Adapter: ...
    def set_routing(self, name: str, routing: Routing) -> Adapter: ...
    def rollback(self, name: str) -> Adapter: ...
    def set_evaluation(self, name: str, version: int, evaluation: Mapping[str, Any]) -> AdapterVersion: ...
    def set_pinned(self, name: str, pinned: bool) -> Adapter: ...
    def remove_version(self, name: str, version: int) -> AdapterVersion: ...
    def remove_adapter(self, name: str) -> list[AdapterVersion]: ...
    def referenced_digests(self) -> set[str]: ...
    def change_token(self) -> str: ...
    def publish_uses(self, uses: Sequence[AdapterUse], *, expire_before: float) -> None: ...
    def read_uses(self, engine: str) -> list[AdapterUse]: ...
    def forget_uses(self, gateway: str) -> None: ...
    def create_key(self, record: KeyRecord) -> KeyRecord: ...
    def update_key(self, name: str, **fields: Any) -> KeyRecord: ...
    def rotate_key(self, name: str, *, key_hash: str, prefix: str, grace_s: float) -> KeyRecord: ...
    def revoke_key(self, name: str) -> KeyRecord: ...
    def list_keys(self, *, include_revoked: bool = False) -> list[KeyRecord]: ...
    def add_usage(self, rows: Sequence[UsageRow]) -> None: ...
    def read_usage(
        self,
        *,
        key: str | None = None,
        model: str | None = None,
        since: int | None = None,
        until: int | None = None,
    ) -> list[UsageRow]: ...
    def setting(self, name: str, default: str) -> str: ...
    def close(self) -> None: ...


def upsert_uses_sql(placeholder: str) -> str:
    """The statement both backends write `adapter_uses` rows with (`?` for SQLite, `%s` for psycopg)."""
    values = ", ".join([placeholder] * 6)
    return (
        "INSERT INTO adapter_uses (engine, adapter, gateway, in_flight, last_used, seen_at)"
        f" VALUES ({values}) ON CONFLICT (engine, adapter, gateway) DO UPDATE SET"
        " in_flight = excluded.in_flight, last_used = excluded.last_used, seen_at = excluded.seen_at"
    )


def use_rows(uses: Sequence[AdapterUse]) -> list[tuple[str, str, str, int, float, float]]:
    return [(u.engine, u.adapter, u.gateway, u.in_flight, u.last_used, u.seen_at) for u in uses]


KEY_COLUMNS = (
    "name",
    "key_hash",
    "prefix",
    "models",
    "limits",
    "expires_at",
    "created_at",
    "revoked_at",
    "rotated_at",
    "previous_hash",
    "previous_until",
)
#: What `update_key` may change.
KEY_UPDATABLE = frozenset({"models", "limits", "expires_at"})


class KeyExistsError(AdapterRefusedError):
    """A live key has this name already: `key_exists` (409)."""


def key_not_found(name: str) -> RegistryNotFoundError:
    return RegistryNotFoundError(f"No API key named {name!r}.", "key_not_found", "name")


def key_row(record: KeyRecord) -> tuple[Any, ...]:
    """`record` as the values of KEY_COLUMNS (models and limits as JSON text)."""
    values = {
        **record.__dict__,
        "models": json.dumps(list(record.models)),
        "limits": json.dumps(record.limits),
    }
    return tuple(values[c] for c in KEY_COLUMNS)


def key_from_row(row: sqlite3.Row | Mapping[str, Any]) -> KeyRecord:
    r = dict(row)
    r["models"] = tuple(json.loads(r["models"]))
    r["limits"] = json.loads(r["limits"])
    return KeyRecord(**{c: r[c] for c in KEY_COLUMNS})


def key_update_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`update_key`'s fields as column values; refuses a field that is not KEY_UPDATABLE."""
    unknown = set(fields) - KEY_UPDATABLE
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    out = dict(fields)
    if "models" in out:
        out["models"] = json.dumps(list(out["models"]))
    if "limits" in out:
        out["limits"] = json.dumps(out["limits"])
    return out


def rotate_sql(placeholder: str) -> str:
    """`rotate_key`'s UPDATE on both backends; its values come from `rotate_values`."""
    sets = ", ".join(
        f"{c} = {placeholder}"
        for c in ("key_hash", "prefix", "rotated_at", "previous_hash", "previous_until")
    )
    return f"UPDATE api_keys SET {sets} WHERE name = {placeholder}"


def rotate_values(old: KeyRecord, key_hash: str, prefix: str, now: float, grace_s: float) -> tuple[Any, ...]:
    """The new secret's hash; the old one kept valid until now + grace_s (none with no grace)."""
    graced = grace_s > 0
    return (
        key_hash,
        prefix,
        now,
        old.key_hash if graced else None,
        now + grace_s if graced else None,
        old.name,
    )


def usage_sql(placeholder: str) -> str:
    """Add a batch to `usage` (both backends; `?` for SQLite, `%s` for psycopg)."""
    values = ", ".join([placeholder] * 7)
    return (
        "INSERT INTO usage (key, model, version, hour, requests, prompt_tokens, completion_tokens)"
        f" VALUES ({values}) ON CONFLICT (key, model, version, hour) DO UPDATE SET"
        " requests = usage.requests + excluded.requests,"
        " prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens,"
        " completion_tokens = usage.completion_tokens + excluded.completion_tokens"
    )


def usage_rows(rows: Sequence[UsageRow]) -> list[tuple[Any, ...]]:
    return [
        (r.key, r.model, r.version, r.hour, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows
    ]


def usage_query(
    placeholder: str, key: str | None, model: str | None, since: int | None, until: int | None
) -> tuple[str, list[Any]]:
    """The SELECT of `read_usage`: rows of hours in [since, until), oldest first."""
    where, params = [], []
    for column, op, value in (
        ("key", "=", key),
        ("model", "=", model),
        ("hour", ">=", since),
        ("hour", "<", until),
    ):
        if value is not None:
            where.append(f"{column} {op} {placeholder}")
            params.append(value)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT * FROM usage{clause} ORDER BY hour, key, model, version", params


def check_new_version(name: str, digest: str) -> None:
    """What every store checks before recording a version: a valid name, a sha256 hex digest."""
    validate_adapter_name(name)
    if not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")


def require_listed(adapter: Adapter | None, name: str) -> Adapter:
    """`adapter` if it has a ready version, else `adapter_not_found`."""
    if adapter is None or not adapter.ready_versions:
        raise RegistryNotFoundError(f"No adapter named {name!r}.", "adapter_not_found", "name")
    return adapter


#: Versions one canary may split between, and the largest weight (weights are relative).
MAX_SPLIT_VERSIONS = 8
MAX_WEIGHT = 1_000_000


def routing_sql(placeholder: str) -> str:
    """The statement both backends change an adapter's routing with."""
    p = placeholder
    return (
        f"UPDATE adapters SET alias_version = {p}, alias_weights = {p}, previous_routing = {p},"
        f" updated_at = {p} WHERE name = {p}"
    )


def evaluation_sql(placeholder: str) -> str:
    p = placeholder
    return f"UPDATE versions SET evaluation = {p} WHERE name = {p} AND version = {p}"


def check_routing(adapter: Adapter, routing: Routing) -> Routing:
    """`routing` checked against `adapter`'s ready versions (`version_not_found`, `invalid_weights`)."""
    if routing.version is not None:
        require_ready(adapter, routing.version)
    if routing.weights is None:
        return routing
    weights = routing.weights
    if not weights or len(weights) > MAX_SPLIT_VERSIONS:
        raise AdapterRefusedError(
            f"Give between 1 and {MAX_SPLIT_VERSIONS} versions with their weights.",
            "invalid_weights",
            "weights",
        )
    for version, weight in weights.items():
        require_ready(adapter, version)
        if not 0 <= weight <= MAX_WEIGHT:
            raise AdapterRefusedError(
                f"Weight {weight} of version {version} is not between 0 and {MAX_WEIGHT}.",
                "invalid_weights",
                "weights",
            )
    if sum(weights.values()) <= 0:
        raise AdapterRefusedError("At least one weight must be positive.", "invalid_weights", "weights")
    if routing.version is not None:
        raise AdapterRefusedError("Give a version or weights, not both.", "invalid_weights", "weights")
    return Routing(None, dict(sorted(weights.items())))


def routing_values(adapter: Adapter, routing: Routing, now: float) -> tuple[Any, ...]:
    """The values of `routing_sql` moving `adapter` to `routing` (checked), keeping what it replaces."""
    new = check_routing(adapter, routing)
    return (new.version, _weights_json(new.weights), _routing_json(adapter.routing), now, adapter.name)


def rollback_values(adapter: Adapter, now: float) -> tuple[Any, ...]:
    """The values of `routing_sql` putting back `adapter`'s previous routing (`nothing_to_roll_back`)."""
    previous = adapter.previous_routing
    if previous is None:
        raise AdapterRefusedError(
            f"Adapter {adapter.name!r} has no earlier routing to roll back to.",
            "nothing_to_roll_back",
            "name",
        )
    return routing_values(adapter, previous, now)


def _weights_json(weights: Mapping[int, int] | None) -> str | None:
    return json.dumps({str(k): v for k, v in weights.items()}) if weights else None


def _routing_json(routing: Routing) -> str:
    return json.dumps(routing.describe())


def _weights_from(text: str | None) -> dict[int, int] | None:
    return {int(k): int(v) for k, v in json.loads(text).items()} if text else None


def _routing_from(text: str | None) -> Routing | None:
    if not text:
        return None
    data = json.loads(text)
    weights = data.get("weights")
    return Routing(data.get("version"), {int(k): int(v) for k, v in weights.items()} if weights else None)


def require_ready(adapter: Adapter, version: int) -> AdapterVersion:
    """`adapter`'s ready `version`, else `version_not_found`."""
    for v in adapter.ready_versions:
        if v.version == version:
            return v
    raise RegistryNotFoundError(
        f"Adapter {adapter.name!r} has no ready version {version}.", "version_not_found", "version"
    )


def version_from_row(row: sqlite3.Row | Mapping[str, Any]) -> AdapterVersion:
    """A `versions` row (sqlite3.Row or a dict: every backend names the columns alike) as a record."""
    r = dict(row)
    return AdapterVersion(
        name=r["name"],
        version=r["version"],
        digest=r["digest"],
        source=r["source"],
        revision=r["revision"],
        description=r["description"],
        rank=r["rank"],
        size_bytes=r["size_bytes"],
        forced_base=bool(r["forced_base"]),
        status=r["status"],
        created_at=r["created_at"],
        evaluation=json.loads(r["evaluation"]) if r.get("evaluation") else None,
    )


def adapter_from_row(row: sqlite3.Row | Mapping[str, Any], versions: list[AdapterVersion]) -> Adapter:
    """An `adapters` row with its versions (oldest first) as a record."""
    r = dict(row)
    return Adapter(
        name=r["name"],
        pinned=bool(r["pinned"]),
        alias_version=r["alias_version"],
        versions=tuple(versions),
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        alias_weights=_weights_from(r.get("alias_weights")),
        previous_routing=_routing_from(r.get("previous_routing")),
    )
