"""Request bodies as they arrive, for the OpenAI and the admin routes alike: read with a size cap (413),
then parsed as one JSON object (400 `invalid_json`), nested no deeper than `MAX_JSON_DEPTH`.

The depth limit keeps hostile JSON (`[[[[...` a hundred thousand times) from reaching Python's recursion
limit in the parser or anywhere the payload is walked again (validation, re-encoding for the engine).
It costs nothing for ordinary bodies: a body with no more brackets than the limit cannot be deeper, and
only one with more is walked (without recursion).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from gateway.errors import InvalidRequestError, PayloadTooLargeError

#: Deepest JSON accepted; the body object itself is level 1 (`{"messages": [{"content": [...]}]}` is 4).
MAX_JSON_DEPTH = 64


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
    except RecursionError:  # the parser's own stack ran out: far deeper than the limit
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _deeper_than(payload, MAX_JSON_DEPTH):
        raise _too_deep()
    return payload


def _too_deep() -> InvalidRequestError:
    return InvalidRequestError(
        f"The request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json"
    )


def _deeper_than(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False
