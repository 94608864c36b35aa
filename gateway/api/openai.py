"""OpenAI-compatible inference routes: chat completions, completions, models.

read the body (size-capped: 413) -> JSON (400) -> validate (400, `param` names the field)
-> check the API key (401/403) -> resolve `model` in the registry (404)
-> pick an engine (503 when none is ready)
-> lease the adapter there (hot-load if needed) -> forward (see gateway/proxy.py) -> release the lease
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from gateway.api.schemas import ChatCompletionRequest, CompletionParams, CompletionRequest
from gateway.auth import api_key, check_model_allowed, may_use
from gateway.engines.base import Engine
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    PayloadTooLargeError,
    UpstreamError,
    UpstreamResponseError,
    validation_error,
)
from gateway.metrics import UNKNOWN, model_label
from gateway.proxy import Finish, SseRewriter, forward_json, forward_stream, model_rewrite
from gateway.registry.catalog import Target
from gateway.residency import Lease
from gateway.state import GatewayState

router = APIRouter()


async def chat_completions(request: Request) -> Response:
    return await _complete(request, "/v1/chat/completions", ChatCompletionRequest)


async def completions(request: Request) -> Response:
    return await _complete(request, "/v1/completions", CompletionRequest)


# The two hot routes are plain Starlette routes: they take the raw request and validate the body
# themselves (OpenAI's error shape, not FastAPI's 422), so FastAPI's per-request dependency solving
# would only add time (about a tenth of the gateway's CPU per request, measured in docs/benchmarks.md).
router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
router.add_route("/v1/completions", completions, methods=["POST"])
# The same two, declared again for the OpenAPI schema (/docs, /openapi.json) only: the Starlette routes
# above come first in the routing table, so these never serve a request.
for _path, _endpoint in (("/v1/chat/completions", chat_completions), ("/v1/completions", completions)):
    router.add_api_route(_path, _endpoint, methods=["POST"], response_model=None)


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    """The base model, each adapter by name (its current version), and each version as `name@N`."""
    state: GatewayState = request.app.state.gateway
    key = api_key(request, state.settings)
    created = int(state.started_at)
    base = state.registry.base_name
    data: list[dict[str, Any]] = []
    if may_use(key, base):
        data.append(_model_card(base, created, root=state.settings.resolved_engine_model()))
    for ref in state.registry.adapters():
        if may_use(key, ref.name):
            data.append(_model_card(ref.name, ref.created or created, root=str(ref.path), parent=base))
    for ref in state.registry.versions():
        if may_use(key, ref.name):
            model_id = f"{ref.name}@{ref.version}"
            data.append(_model_card(model_id, ref.created, root=str(ref.path), parent=base))
    return JSONResponse({"object": "list", "data": data})


def _model_card(model_id: str, created: int, *, root: str, parent: str | None = None) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "lora-gateway",
        "root": root,
        "parent": parent,
        "permission": [],
    }


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"Request body is {declared} bytes; the limit is {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"Request body is over the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidRequestError("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    return payload


def validate(payload: dict[str, Any], schema: type[CompletionParams]) -> CompletionParams:
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc


async def _complete(request: Request, route: str, schema: type[CompletionParams]) -> Response:
    state: GatewayState = request.app.state.gateway
    metrics = state.metrics
    started = time.perf_counter()
    label = UNKNOWN
    lease: Lease | None = None
    engine: Engine | None = None
    finished = False

    def let_go() -> None:
        """Release what this request holds on its engine (before a retry, or when it ends)."""
        nonlocal lease, engine
        if lease is not None:
            lease.release()
            lease = None
        if engine is not None:
            engine.status.active -= 1
            engine = None

    def finish(status: int, error: str | None, usage: dict[str, Any] | None) -> None:
        nonlocal finished
        if finished:
            return
        finished = True
        let_go()
        metrics.child(metrics.in_flight, label).dec()
        metrics.child(metrics.requests, route, label, str(status)).inc()
        if error:
            metrics.child(metrics.errors, route, label, error).inc()
        metrics.child(metrics.latency, route, label).observe(time.perf_counter() - started)
        if usage:
            metrics.child(metrics.prompt_tokens, label).inc(usage.get("prompt_tokens") or 0)
            metrics.child(metrics.completion_tokens, label).inc(usage.get("completion_tokens") or 0)

    metrics.child(metrics.in_flight, label).inc()
    try:
        key = api_key(request, state.settings)
        body = await read_body(request, state.settings.max_body_bytes)
        payload = parse_json(body)
        target = state.registry.resolve(payload["model"]) if isinstance(payload.get("model"), str) else None
        if target is not None:  # a registered name: count this request under it from now on
            metrics.child(metrics.in_flight, label).dec()
            label = model_label(target.label, state.registry.known_labels())
            metrics.child(metrics.in_flight, label).inc()
        parsed = validate(payload, schema)
        requested: str = parsed.model
        if target is None:
            raise ModelNotFoundError(requested)
        check_model_allowed(key, target.label)

        client_wants_usage = bool((parsed.stream_options or {}).get("include_usage"))
        drop_usage = parsed.stream and not client_wants_usage
        if drop_usage:  # ask for the usage event anyway (token metrics); the client will not see it
            payload["stream_options"] = {**(parsed.stream_options or {}), "include_usage": True}
        if payload["model"] != target.engine_model or drop_usage:
            payload["model"] = target.engine_model
            body = json.dumps(payload).encode()
        headers = {
            "content-type": "application/json",
            "x-request-id": request.headers.get("x-request-id") or uuid.uuid4().hex,
        }
        excluded: list[Engine] = []
        retried = False  # one retry at most, and only while nothing has reached the client
        while True:
            engine = state.router.pick(target, exclude=excluded)
            engine.status.active += 1
            if target.adapter is not None:
                lease = await state.residency.acquire(engine, target.adapter)
            try:
                url = engine.url(route)
                return await _forward(
                    state, url, body, headers, parsed, target, requested, finish, drop_usage
                )
            except UpstreamResponseError as exc:
                # vLLM no longer has the adapter (restarted, or unloaded by someone else since our last
                # probe): forget it, so the retry loads it again.
                if retried or target.adapter is None or exc.status_code != 404:
                    raise
                state.residency.forget(engine, target.adapter.engine_name)
                metrics.retries.labels("adapter_lost").inc()
            except UpstreamError as exc:
                # The replica refused the connection or dropped it before answering: it leaves the
                # rotation for a while, and the request goes to another one (generation is safe to
                # repeat, and the client has received nothing yet).
                if exc.code not in ("engine_unreachable", "upstream_error"):
                    raise
                engine.cool_down(state.settings.engine_cooldown_s, exc.message)
                excluded.append(engine)
                if retried or len(state.engines) < 2:
                    raise
                metrics.retries.labels("engine_failed").inc()
            retried = True
            let_go()
    except GatewayError as exc:
        finish(exc.status_code, exc.code or exc.type, None)
        raise
    except BaseException:
        finish(500, "internal_error", None)
        raise


async def _forward(
    state: GatewayState,
    url: str,
    body: bytes,
    headers: dict[str, str],
    parsed: CompletionParams,
    target: Target,
    requested: str,
    finish: Finish,
    drop_usage: bool,
) -> Response:
    if parsed.stream:
        label = model_label(target.label, state.registry.known_labels())
        return await forward_stream(
            state.client,
            url,
            body,
            headers,
            SseRewriter(target.engine_model, requested, drop_usage=drop_usage),
            finish,
            on_first_chunk=state.metrics.child(state.metrics.ttft, label).observe,
        )
    rewrite = model_rewrite(target.engine_model, requested) if target.engine_model != requested else None
    return await forward_json(state.client, url, body, headers, rewrite, finish)
