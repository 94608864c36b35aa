"""Serving one inference request, once its route has read and parsed it: the request pipeline.

    Call(state, route)                 counted in flight (under `unknown` until resolved)
      .resolve(payload)                `model` -> Target (registry); counted under its name from now on
      .send(target, parsed, payload)   the engine's model name and usage options in the body, then:
        place                          router.take(): a slot on an engine (counts its `active`)
                                       residency.acquire(): the adapter leased there (hot-loaded if needed)
        forward                        gateway/proxy.py: the answer, or a stream relayed as it comes
        retry once                     only while nothing reached the client: vLLM lost the adapter (404),
                                       or the replica refused or dropped the connection (another takes it)
      .finish(status, error, usage)    exactly once, on every path: slot and lease let go, metrics written

Routes (gateway/api/openai.py) keep HTTP: read, parse, validate, respond. A `Call` used as an async
context manager records a request that fails before its answer started (`finish` with the error's status);
a stream's end is recorded by the relay, which calls `finish` itself.
"""

from __future__ import annotations

import json
import time
import uuid
from types import TracebackType
from typing import Any

from fastapi.responses import Response

from gateway.api.schemas import CompletionParams
from gateway.engines.base import Engine
from gateway.errors import GatewayError, UpstreamError, UpstreamResponseError
from gateway.metrics import UNKNOWN, model_label
from gateway.proxy import Receive, SseRewriter, forward_json, forward_stream, model_rewrite
from gateway.registry.catalog import Target
from gateway.residency import Lease
from gateway.routing import Slot
from gateway.state import GatewayState

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

    __slots__ = ("state", "route", "started", "label", "slot", "lease", "finished")

    def __init__(self, state: GatewayState, route: str) -> None:
        self.state = state
        self.route = route
        self.started = time.perf_counter()
        self.label = UNKNOWN
        self.slot: Slot | None = None
        self.lease: Lease | None = None
        self.finished = False
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
        target = self.state.registry.resolve(model) if isinstance(model, str) else None
        if target is not None:
            metrics = self.state.metrics
            metrics.child(metrics.in_flight, self.label).dec()
            self.label = model_label(target.label, self.state.registry.known_labels())
            metrics.child(metrics.in_flight, self.label).inc()
        return target

    async def send(
        self,
        target: Target,
        parsed: CompletionParams,
        payload: dict[str, Any],
        body: bytes,
        request_id: str | None,
        receive: Receive | None = None,
    ) -> Response:
        """Place the request on an engine, forward it, and retry once while nothing reached the client.
        `body` is sent as it came unless the engine needs another model name or the usage event."""
        state = self.state
        client_wants_usage = bool((parsed.stream_options or {}).get("include_usage"))
        drop_usage = bool(parsed.stream) and not client_wants_usage
        if drop_usage:  # ask for the usage event anyway (token metrics); the client will not see it
            payload["stream_options"] = {**(parsed.stream_options or {}), "include_usage": True}
        if payload["model"] != target.engine_model or drop_usage:
            payload["model"] = target.engine_model
            body = json.dumps(payload).encode()
        headers = {"content-type": "application/json", "x-request-id": request_id or uuid.uuid4().hex}
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
        if target.adapter is not None:
            self.lease = await self.state.residency.acquire(slot.engine, target.adapter)
        return slot.engine

    async def _forward(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        parsed: CompletionParams,
        target: Target,
        drop_usage: bool,
        receive: Receive | None,
    ) -> Response:
        state, requested = self.state, parsed.model
        if parsed.stream:
            return await forward_stream(
                state.client,
                url,
                body,
                headers,
                SseRewriter(target.engine_model, requested, drop_usage=drop_usage),
                self.finish,
                on_first_chunk=state.metrics.child(state.metrics.ttft, self.label).observe,
            )
        rewrite = model_rewrite(target.engine_model, requested) if target.engine_model != requested else None
        return await forward_json(state.client, url, body, headers, rewrite, self.finish, receive)

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
        metrics, route, label = self.state.metrics, self.route, self.label
        metrics.child(metrics.in_flight, label).dec()
        metrics.child(metrics.requests, route, label, str(status)).inc()
        if error:
            metrics.child(metrics.errors, route, label, error).inc()
        metrics.child(metrics.latency, route, label).observe(time.perf_counter() - self.started)
        if usage:
            metrics.child(metrics.prompt_tokens, label).inc(usage.get("prompt_tokens") or 0)
            metrics.child(metrics.completion_tokens, label).inc(usage.get("completion_tokens") or 0)
