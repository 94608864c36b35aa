"""Admin routes for operators: the adapter registry and the engines. Guarded by `gateway/auth.py`.

POST   /admin/adapters                    register (a new version if the name exists)   201
GET    /admin/adapters                    list
GET    /admin/adapters/{name}             show, with every version
DELETE /admin/adapters/{name}[?version=N] retire the adapter, or one version; in-flight requests finish
POST   /admin/adapters/{name}/pin|unpin   keep it resident on every engine (restored after restarts)
PUT    /admin/adapters/{name}/alias       {"version": N}: `name` resolves to N; DELETE to clear;
                                          {"weights": {"3": 90, "4": 10}}: a canary, sticky per user
POST   /admin/adapters/{name}/rollback    put back the routing the last alias change replaced
PUT    /admin/adapters/{name}/versions/{v}/evaluation   held-out scores, kept on the version
POST   /admin/adapters (tar or multipart) upload the adapter's files (gateway/api/upload.py)
GET    /admin/engines                     state, resident adapters, in-flight counts, last loads

A refusal (validation, source, no such adapter or version) is raised by the registry as an
`AdapterRefusedError` and leaves as the status `gateway/errors.py` gives its code.

Bodies are read by the routes themselves (gateway/api/body.py: `max_admin_body_bytes`, 413; JSON nested
64 levels at most), after `require_admin` has admitted the caller: FastAPI reads a declared body before it
runs a router's dependencies, so an unauthenticated client could otherwise make it read and parse any body.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.api import upload
from gateway.api.body import parse_json, read_body
from gateway.api.responses import (
    ADMIN_TOKEN,
    AdapterList,
    AdapterOut,
    EngineList,
    Registered,
    Removed,
    errors,
    ok,
)
from gateway.auth import require_admin
from gateway.errors import InvalidRequestError, NotFoundError, validation_error
from gateway.registry.service import describe_adapter, describe_version
from gateway.registry.store import AdapterVersion, Routing
from gateway.state import GatewayState

# `ADMIN_TOKEN` only declares the credential in the OpenAPI document; `require_admin` checks it.
router = APIRouter(
    prefix="/admin", dependencies=[Depends(require_admin), Security(ADMIN_TOKEN)], responses=errors(401, 403)
)


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    source: str = Field(min_length=1, description="A folder under an allowed root, or hf://org/repo.")
    revision: str | None = Field(None, description="hf:// only: branch, tag or commit; recorded as a sha.")
    description: str = Field("", max_length=2000)
    pin: bool = False
    force: bool = Field(False, description="Accept an adapter trained for another base (recorded).")


class UploadRequest(BaseModel):
    """The fields of an upload (query parameters of a tar stream, or form fields of a multipart body)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    description: str = Field("", max_length=2000)
    pin: bool = False
    force: bool = Field(False, description="Accept an adapter trained for another base (recorded).")
    origin: str = Field("", max_length=500, description="Where the files came from (recorded).")


class AliasRequest(BaseModel):
    # One of the two, as the schema says: {"version": N} or {"weights": {...}}.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"oneOf": [{"required": ["version"]}, {"required": ["weights"]}]},
    )

    version: int | None = Field(None, ge=1, description="`name` resolves to this version.")
    weights: dict[int, int] | None = Field(
        None,
        description='A canary: {"3": 90, "4": 10} sends requests for `name` to those versions in those '
        "proportions, each end user (`user`, else the sticky header) always to the same one.",
    )

    def routing(self) -> Routing:
        if (self.version is None) == (self.weights is None):
            raise InvalidRequestError("Give either `version` or `weights`.", param="version")
        return Routing(self.version, self.weights)


class EvaluationRequest(BaseModel):
    """Scores of a version on a held-out set, as `lora-gateway adapters promote --eval` measured them."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(max_length=500, description="What was evaluated on (a file name, a digest).")
    metric: str = Field(max_length=64, description="The score compared: exact_match or token_f1.")
    score: float = Field(description="This version's score.")
    scores: dict[str, float | int | None] = Field(
        default_factory=dict, max_length=32, description="Every score measured for this version."
    )
    compared: dict[str, dict[str, float | int | None | str]] = Field(
        default_factory=dict, max_length=8, description="The same scores of what it was compared with."
    )
    decision: str | None = Field(None, max_length=500, description="promoted, or why not.")


Body = TypeVar("Body", bound=BaseModel)


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


async def _body(request: Request, schema: type[Body]) -> Body:
    """The request's body as `schema`, read now that the caller is admitted: capped, parsed, validated."""
    payload = parse_json(await read_body(request, _state(request).settings.max_admin_body_bytes))
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc


def _documented(schema: type[BaseModel]) -> dict[str, Any]:
    """The body `_body` reads, for the OpenAPI schema (FastAPI does not see it)."""
    content = {"application/json": {"schema": schema.model_json_schema()}}
    return {"requestBody": {"required": True, "content": content}}


def _documented_register() -> dict[str, Any]:
    """JSON naming a source, or the files themselves: a tar stream (fields as query parameters) or a
    multipart form (fields and one part per file)."""
    doc = _documented(RegisterRequest)
    fields = UploadRequest.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    doc["requestBody"]["content"]["application/x-tar"] = {"schema": binary}
    multipart = {
        **fields,
        "properties": {**fields["properties"], "file": {"type": "array", "items": binary}},
        "required": ["name", "file"],
    }
    doc["requestBody"]["content"]["multipart/form-data"] = {"schema": multipart}
    return doc


@router.post(
    "/adapters",
    response_model=None,
    status_code=201,
    openapi_extra=_documented_register(),
    responses={**ok(Registered, "Registered: the new version.", status=201), **errors(400, 404, 413, 503)},
)
async def register(request: Request) -> JSONResponse:
    """Register from a source the gateway reads (JSON), or from the files in the body itself (a tar
    stream or a multipart form: gateway/api/upload.py)."""
    state = _state(request)
    if upload.is_upload(request.headers.get("content-type")):
        return await _register_upload(request, state)
    body = await _body(request, RegisterRequest)
    version = await state.registry.register(
        body.name,
        body.source,
        revision=body.revision,
        description=body.description,
        pin=body.pin or None,
        force=body.force,
    )
    return _registered(state, body.name, version)


async def _register_upload(request: Request, state: GatewayState) -> JSONResponse:
    settings = state.settings
    received = await upload.receive(
        request, settings.data_dir / "uploads", settings.registry.max_adapter_bytes
    )
    try:
        try:
            fields = UploadRequest.model_validate(received.fields)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from exc
        version = await state.registry.register_upload(
            fields.name,
            received.folder,
            origin=fields.origin,
            description=fields.description,
            pin=fields.pin or None,
            force=fields.force,
        )
    finally:
        await asyncio.to_thread(received.remove)
    return _registered(state, fields.name, version)


def _registered(state: GatewayState, name: str, version: AdapterVersion) -> JSONResponse:
    adapter = state.registry.adapter(name)
    return JSONResponse(
        {"registered": describe_version(version), "adapter": describe_adapter(adapter) if adapter else None},
        status_code=201,
    )


@router.get(
    "/adapters", response_model=None, responses=ok(AdapterList, "Every adapter, retired versions included.")
)
async def list_adapters(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [describe_adapter(a) for a in _state(request).registry.all()]}


def _adapter_or_404(state: GatewayState, name: str) -> dict[str, Any]:
    adapter = state.registry.adapter(name)
    if adapter is None:
        raise NotFoundError(f"No adapter named `{name}`.", code="adapter_not_found", param="name")
    return describe_adapter(adapter)


@router.get(
    "/adapters/{name}",
    response_model=None,
    responses={**ok(AdapterOut, "The adapter and its versions."), **errors(404)},
)
async def show_adapter(name: str, request: Request) -> dict[str, Any]:
    return _adapter_or_404(_state(request), name)


@router.delete(
    "/adapters/{name}",
    response_model=None,
    responses={**ok(Removed, "The versions retired."), **errors(400, 404)},
)
async def remove_adapter(name: str, request: Request, version: int | None = None) -> dict[str, Any]:
    removed = await _state(request).registry.remove(name, version)
    return {"removed": [describe_version(v) for v in removed]}


async def _pin(request: Request, name: str, pinned: bool) -> dict[str, Any]:
    adapter = await _state(request).registry.set_pinned(name, pinned)
    return describe_adapter(adapter)


@router.post(
    "/adapters/{name}/pin",
    response_model=None,
    responses={**ok(AdapterOut, "The adapter, pinned."), **errors(404)},
)
async def pin(name: str, request: Request) -> dict[str, Any]:
    return await _pin(request, name, True)


@router.post(
    "/adapters/{name}/unpin",
    response_model=None,
    responses={**ok(AdapterOut, "The adapter, unpinned."), **errors(404)},
)
async def unpin(name: str, request: Request) -> dict[str, Any]:
    return await _pin(request, name, False)


@router.put(
    "/adapters/{name}/alias",
    response_model=None,
    openapi_extra=_documented(AliasRequest),
    responses={**ok(AdapterOut, "The adapter, its alias set."), **errors(400, 404, 413)},
)
async def set_alias(name: str, request: Request) -> dict[str, Any]:
    body = await _body(request, AliasRequest)
    adapter = await _state(request).registry.set_routing(name, body.routing())
    return describe_adapter(adapter)


@router.post(
    "/adapters/{name}/rollback",
    response_model=None,
    responses={**ok(AdapterOut, "The adapter, routed as before its last alias change."), **errors(404, 409)},
)
async def rollback(name: str, request: Request) -> dict[str, Any]:
    adapter = await _state(request).registry.rollback(name)
    return describe_adapter(adapter)


@router.put(
    "/adapters/{name}/versions/{version}/evaluation",
    response_model=None,
    openapi_extra=_documented(EvaluationRequest),
    responses={**ok(AdapterOut, "The adapter, the version's scores stored."), **errors(400, 404, 413)},
)
async def set_evaluation(name: str, version: int, request: Request) -> dict[str, Any]:
    body = await _body(request, EvaluationRequest)
    registry = _state(request).registry
    await registry.set_evaluation(name, version, body.model_dump() | {"evaluated_at": time.time()})
    return _adapter_or_404(_state(request), name)


@router.delete(
    "/adapters/{name}/alias",
    response_model=None,
    responses={**ok(AdapterOut, "The adapter, its alias cleared."), **errors(404)},
)
async def clear_alias(name: str, request: Request) -> dict[str, Any]:
    adapter = await _state(request).registry.set_alias(name, None)
    return describe_adapter(adapter)


@router.get(
    "/engines",
    response_model=None,
    responses=ok(EngineList, "Each engine: state, resident adapters, in-flight counts."),
)
async def engines(request: Request) -> dict[str, Any]:
    state = _state(request)
    names = {ref.engine_name: ref.name + f"@{ref.version}" for ref in state.registry.versions()}
    sized = state.settings.lora_sizing()  # vLLM's --max-loras / --max-cpu-loras as counted here
    limits = {**sized.engine_fields(), "max_resident": state.settings.max_resident(), "how": sized.how}
    data = []
    for engine in state.engines:
        residency = state.residency.view(engine)
        info = engine.describe() | residency.describe()
        info["resident_models"] = sorted(names.get(k, k) for k in residency.resident)
        info["pid"] = getattr(engine, "pid", None)
        info["leases"] = state.residency.leases(engine)
        info["lora_limits"] = limits
        data.append(info)
    return {"object": "list", "data": data}
