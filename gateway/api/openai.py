"""OpenAI-compatible inference routes: chat completions, completions, responses, models. HTTP only:

read the body (size-capped: 413) -> JSON (400) -> validate (400, `param` names the field), and the
   work asked for is capped (prompts x n, max_tokens: 400 naming the field); what needs state kept
   in one engine process (the Responses API's `previous_response_id`, `background`) is refused (400)
-> check the API key (401/403) -> resolve `model` in the registry (404)
-> gateway/serving.py: place on an engine (503 when none is ready), lease the adapter there,
   forward (gateway/proxy.py), retry once while nothing reached the client, release on every path
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Security
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from gateway.api.body import parse_json, read_body
from gateway.api.responses import (
    API_KEY,
    RESPONSE_EVENTS,
    ChatCompletion,
    Completion,
    ModelCard,
    ModelList,
    ResponseObject,
    errors,
    ok,
)
from gateway.api.schemas import ChatCompletionRequest, CompletionRequest, InferenceParams, ResponsesRequest
from gateway.auth import api_key, may_use
from gateway.errors import InvalidRequestError, ModelNotFoundError, validation_error
from gateway.serving import Call
from gateway.settings import Settings
from gateway.state import GatewayState
from gateway.tenancy.keys import KeyEntry

router = APIRouter()


async def chat_completions(request: Request) -> Response:
    return await _complete(request, "/v1/chat/completions", ChatCompletionRequest)


async def completions(request: Request) -> Response:
    return await _complete(request, "/v1/completions", CompletionRequest)


async def responses(request: Request) -> Response:
    return await _complete(request, "/v1/responses", ResponsesRequest)


# The inference routes are plain Starlette routes: they take the raw request and validate the body
# themselves (OpenAI's error shape, not FastAPI's 422), so FastAPI's per-request dependency solving
# would only add time (about a tenth of the gateway's CPU per request, measured in docs/benchmarks.md).
router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
router.add_route("/v1/completions", completions, methods=["POST"])
router.add_route("/v1/responses", responses, methods=["POST"])
# The same three, declared again for the OpenAPI schema (/docs, /openapi.json) only: the Starlette routes
# above come first in the routing table, so these never serve a request. Their signatures give the
# document the request bodies; `responses` gives it every status `_complete` can answer.
_INFERENCE_ERRORS = errors(400, 401, 403, 404, 413, 429, 502, 503, 504)


async def _chat_completions_schema(body: ChatCompletionRequest) -> None:
    """Create a chat completion with the base model or an adapter (`model`: `name` or `name@version`).
    With `"stream": true` the answer is server-sent events."""
    raise AssertionError("documentation only: the Starlette route serves /v1/chat/completions")


async def _completions_schema(body: CompletionRequest) -> None:
    """Create a text completion with the base model or an adapter (`model`: `name` or `name@version`).
    With `"stream": true` the answer is server-sent events."""
    raise AssertionError("documentation only: the Starlette route serves /v1/completions")


async def _responses_schema(body: ResponsesRequest) -> None:
    """Create a response (OpenAI's Responses API) with the base model or an adapter (`model`: `name` or
    `name@version`). Stateless: nothing is stored, and `previous_response_id`, `conversation` and
    `background: true` are refused (400 `unsupported_parameter`). With `"stream": true` the answer is
    server-sent events (`response.created`, `response.output_text.delta`, ..., `response.completed`)."""
    raise AssertionError("documentation only: the Starlette route serves /v1/responses")


router.add_api_route(
    "/v1/chat/completions",
    _chat_completions_schema,
    methods=["POST"],
    operation_id="create_chat_completion",
    summary="Chat completion",
    response_model=None,
    dependencies=[Security(API_KEY)],
    responses={**ok(ChatCompletion, "The completion, or its stream.", stream=True), **_INFERENCE_ERRORS},
)
router.add_api_route(
    "/v1/completions",
    _completions_schema,
    methods=["POST"],
    operation_id="create_completion",
    summary="Text completion",
    response_model=None,
    dependencies=[Security(API_KEY)],
    responses={**ok(Completion, "The completion, or its stream.", stream=True), **_INFERENCE_ERRORS},
)
router.add_api_route(
    "/v1/responses",
    _responses_schema,
    methods=["POST"],
    operation_id="create_response",
    summary="Response (Responses API)",
    response_model=None,
    dependencies=[Security(API_KEY)],
    responses={
        **ok(ResponseObject, "The response, or its stream.", stream=True, events=RESPONSE_EVENTS),
        **_INFERENCE_ERRORS,
    },
)


@router.get(
    "/v1/models",
    dependencies=[Security(API_KEY)],
    responses={**ok(ModelList, "The models this key may call."), **errors(401)},
)
async def list_models(request: Request) -> JSONResponse:
    """The base model, each adapter by name (its current version), and each version as `name@N`."""
    state: GatewayState = request.app.state.gateway
    key = api_key(request, state.keyring)
    return JSONResponse({"object": "list", "data": _model_cards(state, key)})


@router.get(
    "/v1/models/{model_id:path}",
    operation_id="retrieve_model",
    dependencies=[Security(API_KEY)],
    responses={**ok(ModelCard, "The model, as `GET /v1/models` lists it."), **errors(401, 404)},
)
async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
    """One model of `GET /v1/models` by its id: the base model, an adapter's name, or `name@version`.
    A model the API key may not call is a 404 like a missing one (its name is not given away)."""
    state: GatewayState = request.app.state.gateway
    key = api_key(request, state.keyring)
    for card in _model_cards(state, key, only=model_id):
        if card["id"] == model_id:
            return JSONResponse(card)
    raise ModelNotFoundError(model_id)


def _model_cards(state: GatewayState, key: KeyEntry | None, only: str | None = None) -> list[dict[str, Any]]:
    """What `GET /v1/models` lists for `key` (the models its globs allow); `only`: just the cards whose
    id may be that one (an adapter's name, or its `name@version`)."""
    created = int(state.started_at)
    base = state.registry.base_name
    name = None if only is None else only.partition("@")[0]
    data: list[dict[str, Any]] = []
    if may_use(key, base) and only in (None, base):
        data.append(_model_card(base, created, root=state.settings.resolved_engine_model()))
    for ref in state.registry.adapters():
        if may_use(key, ref.name) and name in (None, ref.name):
            data.append(_model_card(ref.name, ref.created or created, root=str(ref.path), parent=base))
    for ref in state.registry.versions():
        if may_use(key, ref.name) and name in (None, ref.name):
            model_id = f"{ref.name}@{ref.version}"
            data.append(_model_card(model_id, ref.created, root=str(ref.path), parent=base))
    return data


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


def validate(payload: dict[str, Any], schema: type[InferenceParams]) -> InferenceParams:
    try:
        parsed = schema.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc
    refused = parsed.unsupported()
    if refused is not None:
        param, message = refused
        raise InvalidRequestError(message, param=param, code="unsupported_parameter")
    return parsed


def check_limits(parsed: InferenceParams, settings: Settings) -> None:
    """The work one request may ask for: `max_output_tokens` per completion (`max_tokens`, chat's
    `max_completion_tokens`, the Responses API's `max_output_tokens`), `max_choices` completions
    (prompts x n, each one a sequence vLLM generates). 400 naming the field."""
    cap = settings.max_output_tokens
    for field in parsed.TOKEN_FIELDS:
        value = getattr(parsed, field, None)
        if value is not None and value > cap:
            raise InvalidRequestError(
                f"Invalid value for '{field}': {value}; this gateway allows at most {cap}.",
                param=field,
                code="invalid_value",
            )
    prompts, n = parsed.prompt_count(), parsed.choices()
    if prompts * n > settings.max_choices:
        asked = f"{prompts} prompts x n={n}" if prompts > 1 else f"n={n}"
        raise InvalidRequestError(
            f"The request asks for {asked} = {prompts * n} completions; this gateway allows at most "
            f"{settings.max_choices} per request.",
            param="n" if n > 1 else "prompt",
            code="invalid_value",
        )


async def _complete(request: Request, route: str, schema: type[InferenceParams]) -> Response:
    state: GatewayState = request.app.state.gateway
    async with Call(state, route, request.headers) as call:
        key = api_key(request, state.keyring)
        call.key = key
        body = await read_body(request, state.settings.max_body_bytes)
        payload = parse_json(body)
        target = call.resolve(payload)
        parsed = validate(payload, schema)
        check_limits(parsed, state.settings)
        if target is None:
            raise ModelNotFoundError(parsed.model)
        changed = parsed.prepare(payload)
        if await call.admit(key, target, parsed, payload) or changed:
            body = json.dumps(payload).encode()
        return await call.send(target, parsed, payload, body, request.receive)
