"""Inference API keys: made at runtime through the admin API, or written in the config file.

A secret is `lgw-` + 43 URL-safe characters (256 random bits), shown once, when it is made or rotated.
The registry keeps only its keyed hash, HMAC-SHA256 under the gateway's hashing secret, and its first 8
characters (to tell keys apart in listings). The hashing secret is `auth.key_hash_secret` when set (keep
it out of the database: a copy of the database then gives neither the secrets nor a way to test
guesses); unset, the first gateway stores a random one in the registry (`registry_settings`) and every
gateway sharing the registry uses it. Either way the registry keeps a check value (the hash of a fixed
string): a gateway whose secret disagrees with the one the keys were hashed with refuses to start
(`key_secret_mismatch`) instead of refusing every key.

`Keyring` is the request path's view: every live key by hash, in memory, so checking a key costs one
HMAC (about a microsecond) and one dict lookup, whatever the number of keys; a hash lookup compares no
secret byte by byte, so timing tells nothing about how close a guess was. It is rebuilt whenever the
registry changes (key writes move the registry's change token: a key made, updated, rotated or revoked
on any gateway reaches every gateway within `registry.poll_interval_s`), and at once on the gateway
that made the change. Config keys (`auth.api_keys`) join it under their `name` (`key-1`, `key-2`, ...
when unnamed); the admin API lists them but cannot change them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.registry.store import KeyRecord, RegistryError, RegistryStore
from gateway.settings import ApiKey, KeyLimits

SECRET_PREFIX = "lgw-"
SHOWN_PREFIX = 8  # characters of a secret kept in the registry, for listings
_CHECK = b"lora-gateway key hashing check v1"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


class KeyHasher:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def hash(self, token: str) -> str:
        return hmac.new(self._secret, token.encode(), hashlib.sha256).hexdigest()

    def check_value(self) -> str:
        return hmac.new(self._secret, _CHECK, hashlib.sha256).hexdigest()


def open_hasher(store: RegistryStore, configured: str | None) -> KeyHasher:
    """The hasher every gateway on this registry agrees on (blocking: call through a thread)."""
    secret = configured if configured is not None else store.setting("key_hash_secret", secrets.token_hex(32))
    hasher = KeyHasher(secret.encode())
    if store.setting("key_hash_check", hasher.check_value()) != hasher.check_value():
        raise RegistryError(
            "The registry's API keys were hashed with another secret than this gateway's "
            "(auth.key_hash_secret differs, or is set on one gateway and not on another): every key would be "
            "refused. Give every gateway on this registry the same auth.key_hash_secret.",
            "key_secret_mismatch",
        )
    return hasher


@dataclass(frozen=True)
class KeyEntry:
    """What the request path knows of a key."""

    name: str
    models: tuple[str, ...]
    limits: KeyLimits
    expires_at: float | None = None
    source: str = "api"  # "api" (the registry) or "config" (auth.api_keys)
    valid_until: float | None = None  # a rotated-out secret's end of grace


@dataclass
class Lookup:
    entry: KeyEntry | None
    expired: bool = False


def config_entries(keys: Iterable[ApiKey]) -> list[tuple[str, KeyEntry]]:
    """The config file's keys as (secret, entry)."""
    out = []
    for i, key in enumerate(keys, start=1):
        name = key.name or f"key-{i}"
        out.append(
            (key.key.get_secret_value(), KeyEntry(name, tuple(key.models), key.limits, source="config"))
        )
    return out


def entry_of(record: KeyRecord) -> KeyEntry:
    return KeyEntry(record.name, record.models, KeyLimits(**record.limits), record.expires_at)


@dataclass
class Keyring:
    """Every usable key by hash (see the module doc). `require`: None = keys are required once any exists."""

    hasher: KeyHasher
    store: RegistryStore
    config_keys: list[ApiKey] = field(default_factory=list)
    require: bool | None = None  # auth.require_api_key
    clock: Callable[[], float] = time.time
    _by_hash: dict[str, KeyEntry] = field(default_factory=dict)
    _config: dict[str, KeyEntry] = field(default_factory=dict)
    _names: frozenset[str] = frozenset()
    _ever: bool = False  # a key exists, or existed (revoked): inference is closed
    _started: int = 0  # refreshes begun
    _applied: int = 0  # the latest begun refresh whose read was applied

    def __post_init__(self) -> None:
        self._config = {self.hasher.hash(secret): entry for secret, entry in config_entries(self.config_keys)}
        self._rebuild([])

    async def refresh(self) -> None:
        # Refreshes may overlap (the registry's follower, an admin write): a read that started earlier
        # never replaces what a later one applied (a revoked key would come back until the next poll).
        self._started += 1
        mine = self._started
        records = await asyncio.to_thread(self.store.list_keys, include_revoked=True)
        if mine > self._applied:
            self._applied = mine
            self._rebuild(records)

    def _rebuild(self, records: list[KeyRecord]) -> None:
        by_hash = dict(self._config)
        self._ever = bool(by_hash) or bool(records)
        for record in records:
            if record.revoked_at is not None:
                continue
            entry = entry_of(record)
            by_hash[record.key_hash] = entry
            if record.previous_hash and record.previous_until:
                by_hash[record.previous_hash] = KeyEntry(
                    entry.name,
                    entry.models,
                    entry.limits,
                    entry.expires_at,
                    valid_until=record.previous_until,
                )
        self._by_hash = by_hash
        self._names = frozenset(e.name for e in by_hash.values())

    @property
    def required(self) -> bool:
        """Do inference routes need a key? Yes once any key was made (revoking every key does not open
        them again), unless `auth.require_api_key` says."""
        return self.require if self.require is not None else self._ever

    def names(self) -> frozenset[str]:
        """Names of the usable keys (metric label values)."""
        return self._names

    def config_names(self) -> set[str]:
        return {e.name for e in self._config.values()}

    def config_listing(self) -> list[KeyEntry]:
        return sorted(self._config.values(), key=lambda e: e.name)

    def lookup(self, token: str) -> Lookup:
        entry = self._by_hash.get(self.hasher.hash(token))
        if entry is None:
            return Lookup(None)
        now = self.clock()
        if (entry.expires_at is not None and now >= entry.expires_at) or (
            entry.valid_until is not None and now >= entry.valid_until
        ):
            return Lookup(None, expired=True)
        return Lookup(entry)
