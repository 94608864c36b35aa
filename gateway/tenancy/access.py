"""The access log: one JSON line per inference request, to its own logger `lora_gateway.access`.

    {"time": "2026-12-02T21:04:05.123Z", "request_id": "9f...", "route": "/v1/chat/completions",
     "key": "team-a", "model": "sql", "version": 3, "engine": "http://127.0.0.1:8001", "status": 200,
     "error": null, "stream": true, "prompt_tokens": 12, "completion_tokens": 40, "ttft_ms": 31.2,
     "latency_ms": 412.9}

Written when the request ends, on every path (answered, refused, failed, client gone: `status` 499), from
the request's `finish`, which runs exactly once. Never the secret, never the prompt or the answer: `key`
is the key's name, `model` the registered name the request resolved to (`__unknown__` when it did not).
`ttft_ms` is the time to the first streamed chunk (null for a non-streamed answer). The logger has its own
handler on stdout (the gateway's other logs go to stderr) and does not propagate, so its lines stay
whole JSON whatever the main log's format; `access_log: false` turns it off.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER = "lora_gateway.access"


def access_logger(enabled: bool) -> logging.Logger | None:
    """The access logger, set up once per process; None when turned off."""
    if not enabled:
        return None
    logger = logging.getLogger(LOGGER)
    if not any(getattr(h, "lora_gateway_access", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.lora_gateway_access = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def access_line(fields: dict[str, Any], now: float | None = None) -> str:
    at = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"
    return json.dumps({"time": stamp, **fields}, separators=(",", ":"))
