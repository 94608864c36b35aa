"""Admin routes for tenants: API keys made at runtime, and what each key used. Guarded like admin.py.

POST   /admin/keys                   {"name", "models"?, "expires_at"?, "limits"?}: a new key    201
                                     (the secret in `key`, shown this once)
GET    /admin/keys                   every live key (config file keys too, `source: config`); never a secret
GET    /admin/keys/{name}            one key
PATCH  /admin/keys/{name}            {"models"?, "expires_at"?, "limits"?}: change them (the secret stays)
POST   /admin/keys/{name}/rotate     {"grace_s"?}: a new secret (shown once); the old one keeps working
                                     `grace_s` seconds more (default 0: it stops now)
DELETE /admin/keys/{name}            revoke: refused on this gateway at once, on every other gateway
                                     sharing the registry within registry.poll_interval_s
GET    /admin/usage?key=&model=&since=&until=   requests and tokens per key x model x version x hour

Keys in the config file cannot be changed here (409 `key_in_config`): the file owns them. Names follow
adapter names' rule (a letter or digit, then letters, digits, `.`, `_`, `-`; 64 at most).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.admin import _body, _documented, _state
from gateway.api.responses import ADMIN_TOKEN, errors, ok
from gateway.auth import require_admin
from gateway.errors import ConflictError, InvalidRequestError
from gateway.registry.store import KeyRecord, UsageRow, key_not_found
from gateway.settings import KeyLimits
from gateway.state import GatewayState
from gateway.tenancy.keys import NAME_RE, SHOWN_PREFIX, KeyEntry, new_secret

router = APIRouter(
    prefix="/admin", dependencies=[Depends(require_admin), Security(ADMIN_TOKEN)], responses=errors(401, 403)
)


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=f"^{NAME_RE.pattern}$")
    models: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        max_length=256,
        description="Model names or globs the key may call (`sql*`; the base model by its name).",
    )
    expires_at: datetime | None = Field(None, description="When the key stops working (ISO 8601 or epoch).")
    limits: KeyLimits = Field(default_factory=KeyLimits)


class UpdateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[str] | None = Field(None, min_length=1, max_length=256)
    expires_at: datetime | None = None
    limits: KeyLimits | None = None


class RotateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_s: float = Field(0, ge=0, le=30 * 86400, description="How long the old secret keeps working.")


class KeyOut(BaseModel):
    name: str
    prefix: str | None = Field(description="The secret's first characters (null for config file keys).")
    models: list[str]
    limits: KeyLimits
    expires_at: float | None
    created_at: float | None
    rotated_at: float | None = None
    revoked_at: float | None = None
    source: str = Field(description="`api` (made here, kept in the registry) or `config` (the config file).")


class KeyCreated(KeyOut):
    key: str = Field(description="The secret: shown once, never again.")


class KeyList(BaseModel):
    object: str = "list"
    data: list[KeyOut]


class UsageOut(BaseModel):
    key: str | None = Field(description="The key's name; null for requests made with no key.")
    model: str
    version: int | None = Field(description="The adapter version; null for the base model.")
    hour: int = Field(description="Start of the hour, epoch seconds (UTC).")
    hour_start: str = Field(description="The same, ISO 8601.")
    requests: int
    prompt_tokens: int
    completion_tokens: int


class UsageList(BaseModel):
    object: str = "list"
    data: list[UsageOut]


def epoch(value: datetime | None, param: str) -> float | None:
    """`value` as epoch seconds (a time without a zone is UTC); 400 naming `param` if it has none."""
    if value is None:
        return None
    try:
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError, OSError) as exc:
        raise InvalidRequestError(
            f"Invalid value for '{param}': {exc}", param=param, code="invalid_value"
        ) from exc


def describe_key(record: KeyRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "prefix": record.prefix,
        "models": list(record.models),
        "limits": KeyLimits(**record.limits).model_dump(),
        "expires_at": record.expires_at,
        "created_at": record.created_at,
        "rotated_at": record.rotated_at,
        "revoked_at": record.revoked_at,
        "source": "api",
    }


def describe_config_key(entry: KeyEntry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "prefix": None,
        "models": list(entry.models),
        "limits": entry.limits.model_dump(),
        "expires_at": None,
        "created_at": None,
        "source": "config",
    }


def describe_usage(row: UsageRow) -> dict[str, Any]:
    return {
        "key": row.key or None,
        "model": row.model,
        "version": row.version or None,
        "hour": row.hour,
        "hour_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.hour)),
        "requests": row.requests,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
    }


def _not_in_config(state: GatewayState, name: str) -> None:
    if name in state.keyring.config_names():
        raise ConflictError(
            f"The API key `{name}` is defined in the config file (auth.api_keys): change it there.",
            code="key_in_config",
            param="name",
        )


def _limits(limits: KeyLimits) -> dict[str, int]:
    return limits.model_dump(exclude_none=True)


@router.post(
    "/keys",
    response_model=None,
    status_code=201,
    openapi_extra=_documented(CreateKey),
    responses={
        **ok(KeyCreated, "The new key, with its secret (shown once).", status=201),
        **errors(400, 409, 413),
    },
)
async def create_key(request: Request) -> JSONResponse:
    body = await _body(request, CreateKey)
    state = _state(request)
    _not_in_config(state, body.name)
    expires_at = epoch(body.expires_at, "expires_at")
    if expires_at is not None and expires_at <= time.time():
        raise InvalidRequestError(
            "Invalid value for 'expires_at': it is in the past.", param="expires_at", code="invalid_value"
        )
    secret = new_secret()
    record = KeyRecord(
        name=body.name,
        key_hash=state.keyring.hasher.hash(secret),
        prefix=secret[:SHOWN_PREFIX],
        models=tuple(body.models),
        limits=_limits(body.limits),
        expires_at=expires_at,
        created_at=time.time(),
    )
    await asyncio.to_thread(state.registry.store.create_key, record)
    await state.keyring.refresh()  # usable on this gateway at once
    return JSONResponse({**describe_key(record), "key": secret}, status_code=201)


@router.get("/keys", response_model=None, responses=ok(KeyList, "Every live key, without secrets."))
async def list_keys(request: Request) -> dict[str, Any]:
    state = _state(request)
    records = await asyncio.to_thread(state.registry.store.list_keys)
    data = [describe_config_key(e) for e in state.keyring.config_listing()]
    return {"object": "list", "data": data + [describe_key(r) for r in records]}


@router.get("/keys/{name}", response_model=None, responses={**ok(KeyOut, "The key."), **errors(404)})
async def show_key(name: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    for entry in state.keyring.config_listing():
        if entry.name == name:
            return describe_config_key(entry)
    for record in await asyncio.to_thread(state.registry.store.list_keys):
        if record.name == name:
            return describe_key(record)
    raise key_not_found(name)


@router.patch(
    "/keys/{name}",
    response_model=None,
    openapi_extra=_documented(UpdateKey),
    responses={**ok(KeyOut, "The key, changed."), **errors(400, 404, 409, 413)},
)
async def update_key(name: str, request: Request) -> dict[str, Any]:
    body = await _body(request, UpdateKey)
    state = _state(request)
    _not_in_config(state, name)
    fields: dict[str, Any] = {}
    if body.models is not None:
        fields["models"] = body.models
    if body.limits is not None:
        fields["limits"] = _limits(body.limits)
    if "expires_at" in body.model_fields_set:
        fields["expires_at"] = epoch(body.expires_at, "expires_at")
    if not fields:
        raise InvalidRequestError(
            "Nothing to change: give models, limits or expires_at.", code="invalid_value"
        )
    record = await asyncio.to_thread(state.registry.store.update_key, name, **fields)
    await state.keyring.refresh()
    return describe_key(record)


@router.post(
    "/keys/{name}/rotate",
    response_model=None,
    openapi_extra=_documented(RotateKey),
    responses={**ok(KeyCreated, "The key with its new secret (shown once)."), **errors(400, 404, 409, 413)},
)
async def rotate_key(name: str, request: Request) -> dict[str, Any]:
    body = await _body(request, RotateKey)
    state = _state(request)
    _not_in_config(state, name)
    secret = new_secret()
    record = await asyncio.to_thread(
        state.registry.store.rotate_key,
        name,
        key_hash=state.keyring.hasher.hash(secret),
        prefix=secret[:SHOWN_PREFIX],
        grace_s=body.grace_s,
    )
    await state.keyring.refresh()
    return {**describe_key(record), "key": secret}


@router.delete(
    "/keys/{name}", response_model=None, responses={**ok(KeyOut, "The key, revoked."), **errors(404, 409)}
)
async def revoke_key(name: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    _not_in_config(state, name)
    record = await asyncio.to_thread(state.registry.store.revoke_key, name)
    await state.keyring.refresh()
    return describe_key(record)


def _hour(value: datetime | None, param: str) -> int | None:
    seconds = epoch(value, param)
    return int(seconds) if seconds is not None else None


@router.get(
    "/usage",
    response_model=None,
    responses={**ok(UsageList, "Usage rows, oldest hour first."), **errors(400)},
)
async def usage(
    request: Request,
    key: str | None = Query(None, description="A key's name."),
    model: str | None = Query(None, description="An adapter's name, or the base model's."),
    since: datetime | None = Query(
        None, description="From this time (ISO 8601 or epoch seconds), inclusive."
    ),
    until: datetime | None = Query(None, description="Before this time, exclusive."),
) -> dict[str, Any]:
    state = _state(request)
    await state.usage.flush()  # what this gateway counted so far is in the answer
    start = _hour(since, "since")
    rows = await asyncio.to_thread(
        state.registry.store.read_usage,
        key=key,
        model=model,
        since=start // 3600 * 3600 if start is not None else None,
        until=_hour(until, "until"),
    )
    return {"object": "list", "data": [describe_usage(r) for r in rows]}
