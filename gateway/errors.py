"""The gateway's errors, and the one place where an error becomes a status and an OpenAI error body.

    GatewayError                      500 server_error
    ├── InvalidRequestError           400 invalid_request_error
    │   └── PayloadTooLargeError      413
    ├── AuthenticationError           401 authentication_error
    ├── PermissionDeniedError         403 permission_error
    ├── NotFoundError                 404 invalid_request_error
    │   └── ModelNotFoundError        404 code=model_not_found
    ├── ConflictError                 409 invalid_request_error
    ├── RateLimitError                429 requests, code=rate_limit_exceeded, Retry-After (a key's limit)
    ├── EngineUnavailableError        503 server_error, Retry-After
    ├── UpstreamError                 502 server_error: engine_unreachable (refused), upstream_error
    │                                     (connection dropped), engine_error (the engine's own 5xx)
    ├── UpstreamTimeoutError          504 server_error
    └── UpstreamResponseError         the engine's own 4xx, passed through in OpenAI shape

Adapter refusals are decided away from HTTP (`adapters.validate.AdapterRefusedError`: validation,
source, registry) and carry a stable `code` and a `param`; `refusal_error` maps each code to its class
here, once (`REFUSAL_CLASSES`; any other code is a 400).

Body: `{"error": {"message", "type", "param", "code"}}`; `code` is always a string or null (vLLM sends
an int, OpenAI a string). Mid-stream errors are sent as one `data: {"error": ...}` SSE event.
`ErrorResponse` is that body as a model, for the OpenAPI document (gateway/api/responses.py).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adapters.validate import AdapterRefusedError

log = logging.getLogger("lora_gateway.errors")


class GatewayError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}
        self.extra = extra or {}  # more top-level keys beside "error" (`/health` lists its engines)

    def body(self) -> dict[str, Any]:
        return {**error_body(self.message, self.type, self.param, self.code), **self.extra}


class InvalidRequestError(GatewayError):
    status_code = 400
    type = "invalid_request_error"
    code = "invalid_request"


class PayloadTooLargeError(InvalidRequestError):
    status_code = 413
    code = "payload_too_large"


class AuthenticationError(GatewayError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status_code = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFoundError(GatewayError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", param="model")


class ConflictError(GatewayError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimitError(GatewayError):
    """A key's requests or tokens per minute, or its concurrent requests, are used up: retry later. The
    type is OpenAI's own for this case (`tokens` for a token limit, else `requests`); `param` names the
    limit. The OpenAI SDK retries a 429 after Retry-After."""

    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int, limit: str) -> None:
        super().__init__(message, param=limit, headers={"Retry-After": str(retry_after_s)})
        self.type = "tokens" if limit == "tokens_per_minute" else "requests"


class EngineUnavailableError(GatewayError):
    status_code = 503
    code = "engine_unavailable"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: int = 5,
        code: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)}, extra=extra)


class UpstreamError(GatewayError):
    status_code = 502
    code = "upstream_error"


class EngineUnreachableError(UpstreamError):
    """No connection to the engine; `refused`: its port is closed (the server is gone, not slow)."""

    code = "engine_unreachable"

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class UpstreamTimeoutError(GatewayError):
    status_code = 504
    code = "upstream_timeout"


class UpstreamResponseError(GatewayError):
    """An error answered by the engine itself, passed through with its status."""

    def __init__(self, status_code: int, message: str, type_: str, param: str | None, code: str | None):
        super().__init__(message, param=param)
        self.status_code = status_code
        self.type = type_
        self.code = code


#: Adapter refusal codes whose status is not 400 (`InvalidRequestError`).
REFUSAL_CLASSES: dict[str, type[GatewayError]] = {
    "adapter_not_found": NotFoundError,
    "version_not_found": NotFoundError,
    "source_not_found": NotFoundError,
    "revision_not_found": NotFoundError,
    "source_not_allowed": PermissionDeniedError,
    "too_large": PayloadTooLargeError,
    "engine_unavailable": EngineUnavailableError,  # the base's shapes are not known yet: try again
    "key_not_found": NotFoundError,
    "key_exists": ConflictError,
    "key_in_config": ConflictError,
    "nothing_to_roll_back": ConflictError,
    "source_unavailable": UpstreamError,  # the Hub or the S3 endpoint cannot be reached, or refuses us
}


def refusal_error(exc: AdapterRefusedError) -> GatewayError:
    """An adapter refusal -> the error its code names, with the refusal's message, code and param."""
    cls = REFUSAL_CLASSES.get(exc.code, InvalidRequestError)
    if issubclass(cls, EngineUnavailableError):
        return cls(exc.message, code=exc.code)
    return cls(exc.message, code=exc.code, param=exc.param)


class ErrorObject(BaseModel):
    """OpenAI's error object, as `error_body` writes it (the OpenAPI document's error responses)."""

    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, ...")
    param: str | None = Field(description="The request field at fault, dotted (`messages.0.role`).")
    code: str | None = Field(description="A stable code (`model_not_found`, `payload_too_large`, ...).")


class ErrorResponse(BaseModel):
    """Every error the gateway answers: `{"error": {...}}`, perhaps with more keys beside it."""

    model_config = ConfigDict(extra="allow")

    error: ErrorObject


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": type_,
            "param": param,
            "code": None if code is None else str(code),
        }
    }


def from_upstream(status_code: int, content: bytes) -> GatewayError:
    """Turn an engine's error response (JSON in vLLM's or OpenAI's shape, or anything else) into ours.

    The engine's 4xx are the client's fault and keep their status; its 5xx become 502 (the engine is
    failing), except 503, which keeps its meaning (busy, try again).
    """
    message, type_, param, code = _parse_error(content, status_code)
    if status_code == 503:
        return EngineUnavailableError(f"Engine unavailable: {message}", code="engine_unavailable")
    if status_code >= 500:
        return UpstreamError(f"Engine failed with HTTP {status_code}: {message}", code="engine_error")
    type_ = _OPENAI_TYPES.get(status_code, "invalid_request_error")
    if status_code == 404 and "model" in message.lower():
        code = "model_not_found"
    return UpstreamResponseError(status_code, message, type_, param, code)


# vLLM names its error types after exception classes (BadRequestError, NotFoundError); clients of an
# OpenAI-compatible API expect OpenAI's types.
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def _parse_error(content: bytes, status_code: int) -> tuple[str, str, str | None, str | None]:
    default_type = "invalid_request_error" if status_code < 500 else "server_error"
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        text = content.decode("utf-8", "replace").strip()
        if "<html" in text.lower() or not text:
            text = f"HTTP {status_code}"
        return text[:500], default_type, None, str(status_code)
    err = data.get("error", data) if isinstance(data, dict) else {}
    if isinstance(err, str):
        return err, default_type, None, str(status_code)
    if not isinstance(err, dict):
        return f"HTTP {status_code}", default_type, None, str(status_code)
    message = str(err.get("message") or err.get("detail") or data.get("detail") or f"HTTP {status_code}")
    type_ = str(err.get("type") or default_type)
    param = err.get("param")
    code = err.get("code", status_code)
    return message, type_, None if param is None else str(param), None if code is None else str(code)


def error_response(exc: GatewayError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


def sse_error_event(exc: GatewayError) -> bytes:
    return b"data: " + json.dumps(exc.body()).encode() + b"\n\n"


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the gateway in OpenAI's shape: ours, adapter refusals, FastAPI's validation,
    routing, crashes."""

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(AdapterRefusedError)
    async def _refused(_: Request, exc: AdapterRefusedError) -> JSONResponse:
        return error_response(refusal_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, str(exc.status_code))
        body = error_body(str(exc.detail), type_, None, code)
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_: Request, exc: ClientDisconnect) -> Response:
        # The client left while its body was being read: nobody is there to answer, nothing was started.
        # Not a crash (a 500 and a traceback in the log, as it was).
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("Internal gateway error.", "server_error", None, "internal_error"), 500
        )


def validation_error(errors: Any) -> InvalidRequestError:
    """Pydantic's error list -> one 400 naming the first bad field (`param`, dotted path)."""
    errors = list(errors)
    if not errors:
        return InvalidRequestError("Invalid request body.")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    message = f"Invalid value for '{param}': {msg}" if param else f"Invalid request body: {msg}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return InvalidRequestError(message, param=param, code="invalid_value")
