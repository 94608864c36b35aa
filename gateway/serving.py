"""Serving one inference request, once its route has read and parsed it: the request pipeline.

    Call(state, route, headers)        counted in flight (under `unknown` until resolved); its request id,
                                       its trace span (when tracing is on)
      .resolve(payload)                `model` -> Target (registry); counted under its name from now on
      .admit(key, target, parsed)      the key may call this model, within its max_tokens, and its limits
                                       (requests, tokens per minute, concurrency) admit one more: else
                                       403 / 400 / 429 with Retry-After (gateway/tenancy/limits.py)
      .send(target, parsed, payload)   the engine's model name and usage options in the body, then:
        place                          router.take(): a slot on an engine (counts its `active`)
                                       residency.acquire(): the adapter leased there (hot-loaded if needed)
        forward                        gateway/proxy.py: the answer, or a stream relayed as it comes
        retry once                     only while nothing reached the client: vLLM lost the adapter (404),
                                       or the replica refused or dropped the connection (another takes it)
      .finish(status, error, usage)    exactly once, on every path: slot and lease let go, the key's
                                       admission given back and its tokens counted, metrics, usage
                                       (gateway/tenancy/usage.py), one access log line, the span ended

Routes (gateway/api/openai.py) keep HTTP: read, parse, validate, respond. A `Call` used as an async
context manager records a request that fails before its answer started (`finish` with the error's status);
a stream's end is recorded by the relay, which calls `finish` itself.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from fastapi.responses import Response

from gateway.api.schemas import CompletionParams, InferenceParams, ResponsesRequest
from gateway.auth import check_model_allowed
from gateway.engines.base import Engine
from gateway.errors import (
    EngineUnavailableError,
    GatewayError,
    InvalidRequestError,
    RateLimitError,
    UpstreamError,
    UpstreamResponseError,
)
from gateway.metrics import NO_KEY, UNKNOWN, model_label
from gateway.proxy import (
    Receive,
    ResponsesSseRewriter,
    SseRewriter,
    body_usage,
    forward_json,
    forward_stream,
    model_rewrite,
    responses_body_usage,
)
from gateway.registry.catalog import Target
from gateway.residency import Lease
from gateway.routing import Slot
from gateway.state import GatewayState
from gateway.tenancy.access import access_line
from gateway.tenancy.keys import KeyEntry
from gateway.tenancy.limits import Admission, LimiterUnavailable, RateLimited
from gateway.tracing import ChildSpan, RequestSpan

# Ways a request can end while vLLM may still be generating for it (it aborts at its next step).
ABORTED = frozenset({"client_disconnected", "upstream_timeout", "upstream_error"})


def _engine_failed(exc: GatewayError) -> bool:
    """Did placing the request fail because its engine failed (not because the request or the slots did)?"""
    if exc.code == "engine_unavailable":  # the engine stopped being ready under us
        return True
    cause = exc.__cause__
    return (
        exc.code == "adapter_load_failed"
        and isinstance(cause, UpstreamError)
        and cause.code
        in (
            "engine_unreachable",
            "upstream_error",
        )
    )


class Call:
    """One request on its way through the gateway: where it goes and what it holds there."""

    __slots__ = (
        "state",
        "route",
        "started",
        "label",
        "slot",
        "lease",
        "finished",
        "request_id",
        "key",
        "target",
        "admission",
        "engine",
        "stream",
        "ttft",
        "span",
        "upstream_span",
        "admitted",
        "headers",
    )

    def __init__(self, state: GatewayState, route: str, headers: Mapping[str, str] | None = None) -> None:
        self.state = state
        self.route = route
        self.started = time.perf_counter()
        self.label = UNKNOWN
        self.slot: Slot | None = None
        self.lease: Lease | None = None
        self.finished = False
        self.request_id = ((headers or {}).get("x-request-id") or "")[:128] or uuid.uuid4().hex
        self.key: KeyEntry | None = None
        self.target: Target | None = None
        self.admission: Admission | None = None  # what the key's limiter counted for this request
        self.engine: str | None = None
        self.stream = False
        self.ttft: float | None = None
        tracing = state.tracing
        self.span: RequestSpan | None = tracing.start_request(route, headers or {}) if tracing else None
        self.upstream_span: ChildSpan | None = None
        self.admitted = False  # passed `admit`: its usage counts
        self.headers = headers  # read again only for a name under a canary (`_user`)
        metrics = state.metrics
        metrics.child(metrics.in_flight, UNKNOWN).inc()

    async def __aenter__(self) -> Call:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, GatewayError):
            self.finish(exc.status_code, exc.code or exc.type, None)
        elif exc is not None:
            self.finish(500, "internal_error", None)

    def resolve(self, payload: dict[str, Any]) -> Target | None:
        """The registry's target for `payload["model"]`; a registered name labels this request's metrics."""
        model = payload.get("model")
        user = (
            self._user(payload) if isinstance(model, str) and self.state.registry.has_split(model) else None
        )
        if self.span is None:
            target = self.state.registry.resolve(model, user) if isinstance(model, str) else None
        else:
            with self.span.child("resolve") as span:
                target = self.state.registry.resolve(model, user) if isinstance(model, str) else None
                span.set(**{"lora_gateway.found": target is not None})
        if target is not None:
            metrics = self.state.metrics
            metrics.child(metrics.in_flight, self.label).dec()
            self.label = model_label(target.label, self.state.registry.known_labels())
            metrics.child(metrics.in_flight, self.label).inc()
            self.target = target
        return target

    def _user(self, payload: dict[str, Any]) -> str | None:
        """Who the end user is, for a canary's sticky choice: the body's `user`, else the sticky header."""
        user = payload.get("user")
        if isinstance(user, str) and user:
            return user
        return self.headers.get(self.state.settings.registry.sticky_header) if self.headers else None

    async def admit(
        self, key: KeyEntry | None, target: Target, parsed: InferenceParams, payload: dict[str, Any]
    ) -> bool:
        """May `key` run this request now? 403 (model), 400 (max_tokens), 429 (a limit), else its limiter
        counts it (given back in `finish`). True when the body changed (the key's max_tokens as default)."""
        self.key = key
        if key is None:
            self.admitted = True
            return False
        check_model_allowed(key, target.label)
        changed = False
        cap = key.limits.max_tokens
        if cap is not None:
            changed = cap_max_tokens(parsed, payload, cap, key.name)
        if key.limits.requests_per_minute or key.limits.tokens_per_minute or key.limits.max_concurrent:
            try:
                self.admission = await self.state.limiter.admit(key.name, key.limits)
            except RateLimited as exc:
                metrics = self.state.metrics
                metrics.child(metrics.key_rate_limited, key.name, exc.limit).inc()
                raise RateLimitError(exc.message, retry_after_s=exc.retry_after_s, limit=exc.limit) from None
            except LimiterUnavailable as exc:
                raise EngineUnavailableError(
                    f"The rate limiter is unavailable ({exc}); limits.on_redis_error is deny.",
                    code="limiter_unavailable",
                    retry_after_s=self.state.settings.retry_after_s,
                ) from None
        self.admitted = True
        return changed

    async def send(
        self,
        target: Target,
        parsed: InferenceParams,
        payload: dict[str, Any],
        body: bytes,
        receive: Receive | None = None,
    ) -> Response:
        """Place the request on an engine, forward it, and retry once while nothing reached the client.
        `body` is sent as it came unless the engine needs another model name or the usage event."""
        state = self.state
        drop_usage = False  # chat/completions streams report usage only when asked (`stream_options`)
        if parsed.stream and isinstance(parsed, CompletionParams):
            options = parsed.stream_options or {}
            drop_usage = not options.get("include_usage")
            if drop_usage:  # ask for the usage event anyway (token metrics); the client will not see it
                payload["stream_options"] = {**options, "include_usage": True}
        if payload["model"] != target.engine_model or drop_usage:
            payload["model"] = target.engine_model
            body = json.dumps(payload).encode()
        headers = {"content-type": "application/json", "x-request-id": self.request_id}
        self.stream = bool(parsed.stream)
        excluded: list[Engine] = []
        retried = False  # one retry at most, and only while nothing has reached the client
        while True:
            try:
                engine = await self._place(target, excluded)
            except GatewayError as exc:
                # The replica died while its adapter was being loaded (the load found it refusing, or no
                # longer ready): like a refused request, it leaves the rotation and another one takes it.
                if self.slot is None or retried or len(state.engines) < 2 or not _engine_failed(exc):
                    raise
                failed = self.slot.engine
                failed.cool_down(state.settings.engine_cooldown_s, exc.message)
                excluded.append(failed)
                state.metrics.retries.labels("engine_failed").inc()
                retried = True
                self.let_go()
                continue
            try:
                url = engine.url(self.route)
                return await self._forward(url, body, headers, parsed, target, drop_usage, receive)
            except UpstreamResponseError as exc:
                # vLLM no longer has the adapter (restarted, or unloaded by someone else since our last
                # probe): forget it, so the retry loads it again.
                if retried or target.adapter is None or exc.status_code != 404:
                    raise
                state.residency.forget(engine, target.adapter.engine_name)
                state.metrics.retries.labels("adapter_lost").inc()
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
                state.metrics.retries.labels("engine_failed").inc()
            retried = True
            self.let_go()

    async def _place(self, target: Target, excluded: list[Engine]) -> Engine:
        """A slot on the router's choice of engine, and the adapter leased there."""
        self.slot = slot = self.state.router.take(target, exclude=excluded)
        self.engine = slot.engine.base_url
        if target.adapter is not None:
            lease_span = self.span.start_child("lease") if self.span is not None else None
            try:
                self.lease = await self.state.residency.acquire(slot.engine, target.adapter)
            except BaseException as exc:
                if lease_span is not None:
                    lease_span.end(getattr(exc, "code", None) or type(exc).__name__)
                raise
            if lease_span is not None:
                lease_span.set(**{"lora_gateway.adapter": target.adapter.engine_name})
                lease_span.end()
        return slot.engine

    async def _forward(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        parsed: InferenceParams,
        target: Target,
        drop_usage: bool,
        receive: Receive | None,
    ) -> Response:
        state, requested = self.state, parsed.model
        if self.span is not None:  # vLLM's own spans (--otlp-traces-endpoint) join the request's trace
            if self.upstream_span is not None:  # a retry: the first try's span ends here
                self.upstream_span.end("retried")
            self.upstream_span = self.span.start_child("upstream")
            self.upstream_span.set(**{"server.address": self.engine, "url.full": url})
            headers = {**headers, **self.upstream_span.traceparent()}
        responses = isinstance(parsed, ResponsesRequest)  # the Responses API: its own events and usage
        if parsed.stream:
            rewriter = (
                ResponsesSseRewriter(target.engine_model, requested)
                if responses
                else SseRewriter(target.engine_model, requested, drop_usage=drop_usage)
            )
            return await forward_stream(
                state.client, url, body, headers, rewriter, self.finish, on_first_chunk=self._first_chunk
            )
        rewrite = model_rewrite(target.engine_model, requested) if target.engine_model != requested else None
        usage_of = responses_body_usage if responses else body_usage
        return await forward_json(state.client, url, body, headers, rewrite, self.finish, receive, usage_of)

    def _first_chunk(self, seconds: float) -> None:
        self.ttft = seconds
        metrics = self.state.metrics
        metrics.child(metrics.ttft, metrics.detail(self.label, count=False)).observe(seconds)

    def let_go(self, *, aborted: bool = False) -> None:
        """Give back what this request holds on its engine (before a retry, or when it ends). `aborted`:
        it ended while vLLM may still run it, so the adapter stays held until vLLM has stopped."""
        if self.lease is not None:
            if aborted:
                self.lease.release_when_vllm_stops()
            else:
                self.lease.release()
            self.lease = None
        if self.slot is not None:
            self.slot.release()
            self.slot = None

    def finish(self, status: int, error: str | None, usage: dict[str, Any] | None) -> None:
        """The request has ended (answered, failed, or its client left): record it, exactly once."""
        if self.finished:
            return
        self.finished = True
        self.let_go(aborted=error in ABORTED)
        state, route, label = self.state, self.route, self.label
        latency = time.perf_counter() - self.started
        metrics = state.metrics
        metrics.child(metrics.in_flight, label).dec()
        metrics.child(metrics.requests, route, label, str(status)).inc()
        if error:
            metrics.child(metrics.errors, route, label, error).inc()
        metrics.child(metrics.latency, route, metrics.detail(label)).observe(latency)
        prompt = int((usage or {}).get("prompt_tokens") or 0)
        completion = int((usage or {}).get("completion_tokens") or 0)
        if prompt or completion:
            metrics.child(metrics.prompt_tokens, label).inc(prompt)
            metrics.child(metrics.completion_tokens, label).inc(completion)
        key = self.key
        key_label = key.name if key is not None else NO_KEY
        metrics.child(metrics.key_requests, key_label, str(status)).inc()
        if prompt or completion:
            metrics.child(metrics.key_tokens, key_label, "prompt").inc(prompt)
            metrics.child(metrics.key_tokens, key_label, "completion").inc(completion)
        target = self.target
        version = target.adapter.version if target is not None and target.adapter is not None else 0
        if version:
            metrics.child(metrics.version_requests, label, str(version), str(status)).inc()
            if target is not None and target.canary:  # histograms only while a canary runs: bounded
                metrics.child(metrics.version_latency, label, str(version)).observe(latency)
        if self.admission is not None:
            state.limiter.release(self.admission)
            if prompt or completion:
                state.limiter.add_tokens(self.admission.key, prompt + completion)
        if self.admitted and target is not None:
            state.usage.add(key.name if key is not None else "", target.label, version, prompt, completion)
        if state.access is not None:
            state.access.info(
                access_line(
                    {
                        "request_id": self.request_id,
                        "route": route,
                        "key": key.name if key is not None else None,
                        "model": label,
                        "version": version or None,
                        "engine": self.engine,
                        "status": status,
                        "error": error,
                        "stream": self.stream,
                        "prompt_tokens": prompt if usage else None,
                        "completion_tokens": completion if usage else None,
                        "ttft_ms": round(self.ttft * 1000, 1) if self.ttft is not None else None,
                        "latency_ms": round(latency * 1000, 1),
                    }
                )
            )
        if self.span is not None:
            if self.upstream_span is not None:
                self.upstream_span.end(error)
            self.span.set(
                **{
                    "lora_gateway.key": key.name if key is not None else None,
                    "lora_gateway.model": label,
                    "lora_gateway.adapter_version": version or None,
                    "lora_gateway.engine": self.engine,
                    "lora_gateway.request_id": self.request_id,
                    "gen_ai.usage.input_tokens": prompt if usage else None,
                    "gen_ai.usage.output_tokens": completion if usage else None,
                }
            )
            self.span.end(status, error)


def cap_max_tokens(parsed: InferenceParams, payload: dict[str, Any], cap: int, key: str) -> bool:
    """The key's `max_tokens`: a request asking for more (in any of its route's token fields:
    `max_tokens`, chat's `max_completion_tokens`, the Responses API's `max_output_tokens`) is refused (400:
    no retry can succeed); one asking for none gets the cap in its first one (the body changes: True)."""
    asked = False
    for field in parsed.TOKEN_FIELDS:
        value = getattr(parsed, field, None)
        if value is None:
            continue
        asked = True
        if value > cap:
            raise InvalidRequestError(
                f"Invalid value for '{field}': {value}; the API key `{key}` allows at most {cap}.",
                param=field,
                code="max_tokens_over_key_limit",
            )
    if asked:
        return False
    payload[parsed.TOKEN_FIELDS[0]] = cap
    return True
