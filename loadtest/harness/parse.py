"""Reading OpenAI-format responses into a ``RequestResult``; no network, so any client can use it.

Non-streaming: the body's ``usage``. Streaming (SSE): ``data:`` lines are JSON events until
``data: [DONE]``; a chunk whose first choice has non-empty ``delta.content`` (chat; also
``reasoning_content``/``reasoning``) or ``text`` (completions), or non-empty ``token_ids`` (vLLM's
``return_token_ids``, which sends a chunk per token even while the detokenizer holds back an
incomplete character), is a content chunk: its arrival time is recorded, the first one is TTFT.
``usage`` from the final chunk (``stream_options: {include_usage: true}``) gives the token counts;
without it completion tokens are the number of content chunks. A ``data: {"error": ...}`` event
ends the request as ``stream_error``; a stream that ends without ``[DONE]`` is ``incomplete_stream``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from loadtest.harness.records import RequestResult

_CONTENT_KEYS = ("content", "reasoning_content", "reasoning")


def error_message(body: bytes | str) -> str:
    """The ``error.message`` of an OpenAI error body, else the start of the body."""
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))[:300]
        if err is not None:
            return str(err)[:300]
    except (ValueError, AttributeError):
        pass
    text = body if isinstance(body, str) else body.decode("utf-8", "replace")
    return text[:300]


def take_usage(rec: RequestResult, usage: Any) -> None:
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.completion_tokens = usage["completion_tokens"]
        rec.usage_reported = True


def fail(rec: RequestResult, kind: str, message: str) -> None:
    rec.ok, rec.error_kind, rec.error = False, kind, message[:300]


def choice_text(choice: dict[str, Any]) -> str:
    """A non-streamed choice's generated text: `message.content` (chat) or `text` (completions)."""
    message = choice.get("message")
    return (message.get("content") if isinstance(message, dict) else choice.get("text")) or ""


def read_body(rec: RequestResult, status: int, body: bytes) -> None:
    """A complete (non-streaming, or error) response."""
    rec.status = status
    if status >= 400:
        fail(rec, str(status), error_message(body))
        return
    data = json.loads(body)
    if not isinstance(data, dict) or "error" in data:
        fail(rec, "response_error", error_message(body))
        return
    take_usage(rec, data.get("usage"))
    choices = data.get("choices")
    if choices and isinstance(choices[0], dict):
        first = choices[0]
        rec.text = choice_text(first)
        if isinstance(first.get("token_ids"), list):
            rec.token_ids = first["token_ids"]
    rec.ok = True


class StreamParser:
    """Feed it the lines of an SSE response as they arrive; ``feed`` says when to stop reading."""

    __slots__ = ("rec", "start", "done", "failed", "parts", "ids")

    def __init__(self, rec: RequestResult, start: float) -> None:
        self.rec, self.start = rec, start
        self.done = self.failed = False
        self.parts: list[str] = []
        self.ids: list[int] | None = None

    def feed(self, line: str | bytes) -> bool:
        """Take one line; True once the stream is over (``[DONE]`` or an error event)."""
        if isinstance(line, bytes):
            if not line.startswith(b"data:"):
                return False
            payload: str | bytes = line[5:].strip()
            finished = payload == b"[DONE]"
        else:
            if not line.startswith("data:"):
                return False
            payload = line[5:].strip()
            finished = payload == "[DONE]"
        rec = self.rec
        now = time.perf_counter() - self.start
        if rec.ttfb is None:
            rec.ttfb = now
        if finished:
            self.done = True
            return True
        event = json.loads(payload)
        if not isinstance(event, dict):
            return False
        if "error" in event:
            rec.e2e = now
            fail(rec, "stream_error", error_message(payload))
            self.failed = True
            return True
        choices = event.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta")
            if delta is None:
                text = choice.get("text")
                if text:
                    self.parts.append(text)
            else:
                text = next((delta[k] for k in _CONTENT_KEYS if delta.get(k)), None)
                if delta.get("content"):
                    self.parts.append(delta["content"])
            token_ids = choice.get("token_ids")
            if token_ids:
                if self.ids is None:
                    self.ids = []
                self.ids.extend(token_ids)
            if text or token_ids:  # vLLM's return_token_ids: a chunk per token
                if rec.ttft is None:
                    rec.ttft = now
                rec.chunk_times.append(now)
        if event.get("usage"):
            take_usage(rec, event["usage"])
        return False

    def finish(self) -> None:
        """Call when the response ended (after the last line or an early stop)."""
        rec = self.rec
        if rec.e2e is None:
            rec.e2e = time.perf_counter() - self.start
        if self.failed:
            return
        if not self.done:
            fail(rec, "incomplete_stream", "stream ended without data: [DONE]")
            return
        if not rec.usage_reported:
            rec.completion_tokens = len(rec.chunk_times)
        rec.text = "".join(self.parts)
        rec.token_ids = self.ids
        rec.ok = True
