"""What the routes answer, as the OpenAPI document (/openapi.json, /docs) describes it: the shape of each
success, the credentials each route takes, and every error status a route can return, each in OpenAI's
error shape (`gateway.errors.ErrorResponse`).

Documentation only: nothing here validates a response. The OpenAI routes pass the engine's answers
through as sent (vLLM's own fields included, hence `extra="allow"`); the admin routes build theirs in
`gateway/registry/service.py` (`describe_adapter`, `describe_version`). `tests/test_openapi_fuzz.py` holds
the two together: schemathesis checks every answer of a live gateway against this document.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import ErrorResponse

#: The credentials, as the document declares them. `auto_error=False`: they only document; the checks
#: are in gateway/auth.py (`api_key`, `require_admin`), which keep their own statuses and messages.
API_KEY = HTTPBearer(
    scheme_name="ApiKey",
    auto_error=False,
    description="An inference API key (`auth.api_keys`). With none configured the inference routes are open.",
)
ADMIN_TOKEN = HTTPBearer(
    scheme_name="AdminToken",
    auto_error=False,
    description="The admin token (`auth.admin_token`). With none set, admin routes answer local clients "
    "only.",
)

ERROR_DESCRIPTIONS: dict[int | str, str] = {
    400: "Invalid request: a body that is not one JSON object, a field out of range (`param` names it), "
    "more work than the gateway allows, an adapter refused.",
    401: "No valid credentials: an API key on the inference routes (when keys are configured), the admin "
    "token on the admin routes (when one is set).",
    403: "Not allowed: an API key calling a model its globs do not match, an adapter source outside the "
    "allowed roots, or an admin route called by a non-local client while no admin token is set.",
    404: "No such model, adapter, version or source.",
    409: "Conflict: a name already taken (an API key), or a key the config file owns.",
    413: "The request body, or the adapter to register, is over its size limit.",
    429: "The API key's requests or tokens per minute, or its concurrent requests, are used up "
    "(`param` names the limit); Retry-After says when to try again.",
    500: "Internal gateway error.",
    502: "The engine failed (its own 5xx) or the connection to it failed.",
    503: "No engine can take the request now (none ready, all busy, the adapter still loading); Retry-After "
    "says when to try again.",
    504: "The engine did not answer in time.",
    "4XX": "Any other client error (an error the engine itself answered, a method not allowed), in the "
    "same shape.",
}

_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "string"}}
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for these error statuses, plus the 500 and the other 4xx any route can answer."""
    documented: dict[int | str, dict[str, Any]] = {}
    wanted: tuple[int | str, ...] = (*statuses, 500, "4XX")
    for status in wanted:
        documented[status] = {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        if status in (429, 503):
            documented[status]["headers"] = _RETRY_AFTER
    return documented


#: What a chat or text completion's stream sends.
COMPLETION_EVENTS = (
    '`data: {chunk}` events, ending with `data: [DONE]` (or one `data: {"error": ...}` event).'
)
#: What a Responses API stream sends.
RESPONSE_EVENTS = (
    "`event: <type>` + `data: {event}`: `response.created`, `response.in_progress`, "
    "`response.output_text.delta`, ..., `response.completed` (its `response` holds `usage`); no `[DONE]`. "
    'A failure after the first byte is one `data: {"error": ...}` event.'
)


def ok(
    model: type[BaseModel],
    description: str,
    *,
    status: int = 200,
    stream: bool = False,
    events: str = COMPLETION_EVENTS,
) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a success in `model`'s shape; `stream`: or server-sent events (`"stream": true`),
    as `events` describes them."""
    response: dict[str, Any] = {"model": model, "description": description}
    if stream:
        # For text/event-stream, OpenAPI's schema describes one event (its `data`, `event`, `id` fields).
        event = {
            "type": "object",
            "properties": {"data": {"type": "string", "description": events}, "event": {"type": "string"}},
            "required": ["data"],
        }
        response["content"] = {"text/event-stream": {"schema": event}}
    return {status: response}


class _Open(BaseModel):
    """An object that may carry more fields than documented (the engine's own, newer ones)."""

    model_config = ConfigDict(extra="allow")


class Usage(_Open):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int | None = None


class ChatMessageOut(_Open):
    role: str
    content: str | None = None


class ChatChoice(_Open):
    index: int
    message: ChatMessageOut
    finish_reason: str | None = None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: str | None = None


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ResponseUsage(_Open):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class ResponseObject(_Open):
    """A Responses API answer (`POST /v1/responses`), as vLLM writes it; `model` is the name the client
    asked for."""

    id: str
    object: Literal["response"]
    created_at: float
    model: str
    status: str | None = None
    output: list[Any]
    usage: ResponseUsage | None = None


class ModelCard(BaseModel):
    id: str = Field(description="The base model's name, an adapter's name, or `name@version`.")
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    permission: list[Any]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class EngineHealth(BaseModel):
    name: str
    state: str
    answers: bool


class Health(BaseModel):
    status: Literal["ok"]
    engines: list[EngineHealth]


class HealthUnavailable(ErrorResponse):
    """503 from /health: the error, and each engine's state beside it."""

    engines: list[EngineHealth]


class AdapterVersionOut(BaseModel):
    version: int
    model: str = Field(description="`name@version`, callable as a model.")
    digest: str
    source: str
    revision: str | None
    description: str
    rank: int
    size_bytes: int
    forced_base: bool
    status: str
    created_at: float
    engine_name: str
    evaluation: dict[str, Any] | None = Field(
        description="Held-out scores stored by `lora-gateway adapters promote --eval`, else null."
    )


class RoutingOut(BaseModel):
    version: int | None
    weights: dict[str, int] | None


class AdapterOut(BaseModel):
    name: str
    pinned: bool
    alias_version: int | None
    alias_weights: dict[str, int] | None = Field(
        description="A canary: version -> weight over ready versions, else null."
    )
    previous_routing: RoutingOut | None = Field(description="What `rollback` would put back.")
    current_version: int | None = Field(
        description="What `name` resolves to (during a canary: the version with the largest weight)."
    )
    versions: list[AdapterVersionOut]
    created_at: float
    updated_at: float


class Registered(BaseModel):
    registered: AdapterVersionOut
    adapter: AdapterOut | None


class AdapterList(BaseModel):
    object: Literal["list"]
    data: list[AdapterOut]


class Removed(BaseModel):
    removed: list[AdapterVersionOut]


class EngineInfo(_Open):
    name: str
    state: str
    resident_models: list[str]
    leases: Any = None
    lora_limits: dict[str, Any] | None = None  # max_loras, max_cpu_loras, max_resident, how they were chosen


class EngineList(BaseModel):
    object: Literal["list"]
    data: list[EngineInfo]
