"""The registry as the gateway uses it: register, version, pin, retire; and the catalog requests resolve in.

    register(name, source)
      resolve the source (allowed local roots, or hf:// pinned to a commit sha)   gateway/registry/sources.py
      stage a copy of the files in the content-addressed store                    gateway/registry/blobs.py
      validate the staged bytes against the served base (no torch)                adapters/validate.py
      commit the blob (atomic rename), then the version row (one transaction)     gateway/registry/store.py
    A crash in between leaves an unreferenced blob (removed by `gc`), never a half row or half a folder.

Requests never touch SQLite: `resolve()` reads an in-memory snapshot, rebuilt after every change.
vLLM knows each version by its content digest (`lora_name = "lora-<digest[:16]>"`), so two names or two
gateways with the same bytes share one engine slot, and a name can never be served from another's bytes.
All blocking work (hub calls, copies, hashing, SQLite) runs in threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.validate import (
    AdapterInfo,
    AdapterRefusedError,
    AdapterValidationError,
    BaseModelSpec,
    validate_adapter_dir,
    validate_adapter_name,
)
from gateway.registry.blobs import BlobStore
from gateway.registry.catalog import AdapterRef, Target
from gateway.registry.sources import ResolvedSource, SourceError, check_contained, resolve_source
from gateway.registry.split import Split
from gateway.registry.store import Adapter, AdapterVersion, RegistryStore, Routing

log = logging.getLogger("lora_gateway.registry")


def engine_name(digest: str) -> str:
    return f"lora-{digest[:16]}"


@dataclass(frozen=True)
class RegistryLimits:
    max_rank: int
    max_bytes: int
    allowed_roots: Sequence[Path]
    s3_buckets: Sequence[str] = ()  # s3:// sources: allowed buckets, empty = any (registry.s3_buckets)


class Registry:
    """The catalog the request path resolves in (memory only), and the writes of the admin API.

    Refusals are `AdapterRefusedError`s (validation, source, no such adapter or version), whose codes
    `gateway/errors.py` turns into statuses; nothing here speaks HTTP."""

    def __init__(
        self,
        store: RegistryStore,
        blobs: BlobStore,
        base: BaseModelSpec | None,
        base_name: str,
        limits: RegistryLimits,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.base = base
        self.base_name = base_name
        self.limits = limits
        self._names: dict[str, AdapterRef] = {}  # "sql" -> its current version
        self._labels: frozenset[str] = frozenset({base_name})  # metric label values: base + names
        self._versions: dict[str, AdapterRef] = {}  # "sql@3" -> that version
        self._splits: dict[str, Split] = {}  # "sql" -> its canary's versions and weights
        self._adapters: dict[str, Adapter] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[Callable[[], Any]] = []
        self._token: str | None = None  # the store's change token at the last refresh

    # --- the catalog (request path: memory only) -------------------------------------------------
    def has_split(self, model: str) -> bool:
        """Whether `model` is a name under a canary (its request's user decides the version)."""
        return model in self._splits

    def resolve(self, model: str, user: str | None = None) -> Target | None:
        """`model` -> what to run on. A name under a canary picks a version per request, by `user`
        (sticky) when given (gateway/registry/split.py)."""
        if model == self.base_name:
            return Target(model, self.base_name)
        split = self._splits.get(model)
        if split is not None:
            picked = split.pick(user)
            return Target(model, picked.engine_name, picked, canary=True)
        ref = self._names.get(model) or self._versions.get(model)
        return Target(model, ref.engine_name, ref) if ref else None

    def adapters(self) -> list[AdapterRef]:
        return list(self._names.values())

    def versions(self) -> list[AdapterRef]:
        return list(self._versions.values())

    def known_labels(self) -> frozenset[str]:
        return self._labels

    def adapter(self, name: str) -> Adapter | None:
        return self._adapters.get(name)

    def all(self) -> list[Adapter]:
        return list(self._adapters.values())

    def on_change(self, listener: Callable[[], Any]) -> None:
        self._listeners.append(listener)

    # --- writes ------------------------------------------------------------------------------------
    async def follow(self, interval_s: float) -> None:
        """Refresh whenever the store changed, also by another gateway sharing it (runs forever)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                token = await asyncio.to_thread(self.store.change_token)
                if token != self._token:
                    await self.refresh()
            except Exception:  # the database is briefly unreachable: keep serving the last snapshot
                log.exception("reading registry changes failed; serving the last known registry")

    async def refresh(self) -> None:
        self._token = await asyncio.to_thread(self.store.change_token)
        adapters = await asyncio.to_thread(self.store.list_adapters)
        names: dict[str, AdapterRef] = {}
        versions: dict[str, AdapterRef] = {}
        splits: dict[str, Split] = {}
        for adapter in adapters:
            current = adapter.current
            refs: dict[int, AdapterRef] = {}
            for v in adapter.ready_versions:
                ref = refs[v.version] = self._ref(adapter, v)
                versions[v.model_id] = ref
                if current is not None and v.version == current.version:
                    names[adapter.name] = ref
            if weights := adapter.weights:
                splits[adapter.name] = Split(adapter.name, [refs[v] for v in weights], list(weights.values()))
        self._adapters = {a.name: a for a in adapters}
        self._names, self._versions, self._splits = names, versions, splits
        self._labels = frozenset({self.base_name, *names})
        for listener in self._listeners:
            result = listener()
            if asyncio.iscoroutine(result):
                await result

    def _ref(self, adapter: Adapter, v: AdapterVersion) -> AdapterRef:
        return AdapterRef(
            name=adapter.name,
            engine_name=engine_name(v.digest),
            path=self.blobs.path(v.digest),
            version=v.version,
            pinned=adapter.pinned,
            created=int(v.created_at),
        )

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def register(
        self,
        name: str,
        source: str,
        *,
        revision: str | None = None,
        description: str = "",
        pin: bool | None = None,
        force: bool = False,
        refresh: bool = True,
    ) -> AdapterVersion:
        """Validate and store a new version of `name`. Raises an `AdapterRefusedError` on refusal; code
        `engine_unavailable` while the base's shapes are unknown (nothing to validate against yet).
        `refresh=False` leaves the in-memory snapshot to the caller's one `refresh()` (a bulk seed)."""
        self._check_registrable(name)
        async with self._lock(name):
            version = await asyncio.to_thread(
                self._register_blocking, name, source, revision, description, pin, force
            )
            if refresh:
                await self.refresh()
        log.info("registered %s (digest %s) from %s", version.model_id, version.digest[:12], version.source)
        return version

    def _check_registrable(self, name: str) -> None:
        """A valid name, not the base's; the base's shapes known (else `engine_unavailable`: try again)."""
        validate_adapter_name(name, reserved={self.base_name})
        if self.base is None:
            msg = "The base model's config.json is not available; cannot validate."
            raise AdapterRefusedError(msg, "engine_unavailable")

    def _register_blocking(
        self, name: str, source: str, revision: str | None, description: str, pin: bool | None, force: bool
    ) -> AdapterVersion:
        resolved = resolve_source(
            source,
            revision=revision,
            allowed_roots=self.limits.allowed_roots,
            s3_buckets=self.limits.s3_buckets,
            max_bytes=self.limits.max_bytes,
        )
        try:
            return self._store_resolved(name, resolved, description, pin, force)
        finally:
            if resolved.cleanup is not None:  # s3: the downloaded folder, copied by stage() or refused
                resolved.cleanup()

    def _store_resolved(
        self, name: str, resolved: ResolvedSource, description: str, pin: bool | None, force: bool
    ) -> AdapterVersion:
        self._validate(resolved.path, force)  # the source as given: refuses pickles, .py files, ...
        staged = self.blobs.stage(resolved.path, max_bytes=self.limits.max_bytes)
        try:
            info = self._validate(staged.path, force)  # the bytes that will be served
        except BaseException:
            self.blobs.discard(staged)
            raise
        self.blobs.commit(staged)
        return self.store.add_version(
            name,
            digest=staged.digest,
            source=resolved.source,
            rank=info.rank,
            size_bytes=staged.size_bytes,
            revision=resolved.revision,
            description=description,
            forced_base=info.base_mismatch_forced,
            pinned=pin,
        )

    async def register_upload(
        self,
        name: str,
        folder: Path,
        *,
        origin: str = "",
        description: str = "",
        pin: bool | None = None,
        force: bool = False,
    ) -> AdapterVersion:
        """Register the files a client uploaded into `folder` (gateway/api/upload.py), validated and stored
        exactly as a local folder's; recorded with the source `upload:<origin>`. The caller removes
        `folder`."""
        self._check_registrable(name)
        check_contained(folder, folder)
        resolved = ResolvedSource("upload", folder, f"upload:{origin}", None, None, folder)
        async with self._lock(name):
            version = await asyncio.to_thread(self._store_resolved, name, resolved, description, pin, force)
            await self.refresh()
        log.info(
            "registered %s (digest %s), uploaded from %s",
            version.model_id,
            version.digest[:12],
            origin or "?",
        )
        return version

    def _validate(self, folder: Path, force: bool) -> AdapterInfo:
        assert self.base is not None
        return validate_adapter_dir(
            folder,
            self.base,
            max_rank=self.limits.max_rank,
            max_bytes=self.limits.max_bytes,
            allowed_base_names={self.base_name},
            force_base=force,
        )

    async def seed(self, folder: Path) -> list[str]:
        """Register each PEFT folder in `folder` whose current bytes are not registered yet (idempotent).
        A folder that fails validation is logged and skipped: one bad adapter dropped into the folder
        must not keep the gateway (and every other adapter) from starting."""
        added: list[str] = []
        for sub in await asyncio.to_thread(_adapter_folders, folder):
            try:
                digest = await asyncio.to_thread(self.blobs.digest_of, sub, max_bytes=self.limits.max_bytes)
                current = self._names.get(sub.name)
                if current is not None and current.engine_name == engine_name(digest):
                    continue
                await self.register(sub.name, str(sub), refresh=False)  # one snapshot at the end
            except (AdapterValidationError, SourceError) as exc:
                log.error("not registering %s from %s: %s", sub.name, folder, exc)
                continue
            added.append(sub.name)
        if added:
            await self.refresh()
        return added

    async def set_pinned(self, name: str, pinned: bool) -> Adapter:
        async with self._lock(name):
            adapter = await asyncio.to_thread(self.store.set_pinned, name, pinned)
            await self.refresh()
        return adapter

    async def set_alias(self, name: str, version: int | None) -> Adapter:
        return await self.set_routing(name, Routing(version))

    async def set_routing(self, name: str, routing: Routing) -> Adapter:
        """`name` -> one version, weights over versions (a canary), or the newest (`Routing()`)."""
        async with self._lock(name):
            adapter = await asyncio.to_thread(self.store.set_routing, name, routing)
            await self.refresh()
        log.info("%s now routes to %s", name, routing.describe())
        return adapter

    async def rollback(self, name: str) -> Adapter:
        """Put back the routing the last change replaced (`nothing_to_roll_back` if none)."""
        async with self._lock(name):
            adapter = await asyncio.to_thread(self.store.rollback, name)
            await self.refresh()
        log.info("%s rolled back to %s", name, adapter.routing.describe())
        return adapter

    async def set_evaluation(self, name: str, version: int, evaluation: dict[str, Any]) -> AdapterVersion:
        async with self._lock(name):
            record = await asyncio.to_thread(self.store.set_evaluation, name, version, evaluation)
            await self.refresh()
        return record

    async def remove(self, name: str, version: int | None = None) -> list[AdapterVersion]:
        async with self._lock(name):
            if version is None:
                removed = await asyncio.to_thread(self.store.remove_adapter, name)
            else:
                removed = [await asyncio.to_thread(self.store.remove_version, name, version)]
            await self.refresh()
        return removed

    async def gc(self, keep: set[str], *, min_age_s: float = 60.0) -> list[str]:
        """Delete stored blobs no ready version references and no engine still holds (`keep`)."""
        referenced = await asyncio.to_thread(self.store.referenced_digests)
        keep_digests = referenced | {
            d for d in await asyncio.to_thread(self.blobs.list_digests) if engine_name(d) in keep
        }
        return await asyncio.to_thread(self.blobs.gc, keep_digests, min_age_s=min_age_s)


def _adapter_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (p / "adapter_config.json").is_file())


def describe_version(v: AdapterVersion) -> dict[str, Any]:
    return {
        "version": v.version,
        "model": v.model_id,
        "digest": v.digest,
        "source": v.source,
        "revision": v.revision,
        "description": v.description,
        "rank": v.rank,
        "size_bytes": v.size_bytes,
        "forced_base": v.forced_base,
        "status": v.status,
        "created_at": v.created_at,
        "engine_name": engine_name(v.digest),
        "evaluation": v.evaluation,
    }


def describe_adapter(a: Adapter) -> dict[str, Any]:
    current = a.current
    return {
        "name": a.name,
        "pinned": a.pinned,
        "alias_version": a.alias_version,
        "alias_weights": {str(k): w for k, w in a.weights.items()} if a.weights else None,
        "previous_routing": a.previous_routing.describe() if a.previous_routing else None,
        "current_version": current.version if current else None,
        "versions": [describe_version(v) for v in a.versions],
        "created_at": a.created_at,
        "updated_at": a.updated_at,
    }


def load_base_spec(model: str, name: str) -> BaseModelSpec | None:
    """The served base's shapes, from a local folder or the Hugging Face cache; None if unavailable."""
    folder = Path(model)
    if (folder / "config.json").is_file():
        return BaseModelSpec.from_model_dir(folder, name)
    try:
        from huggingface_hub import hf_hub_download

        config = hf_hub_download(model, "config.json")
    except Exception as exc:  # offline and not cached, private, gone: registration will say so
        log.warning("cannot read config.json of base model %s: %s", model, exc)
        return None
    return BaseModelSpec.from_model_dir(Path(config).parent, name)
