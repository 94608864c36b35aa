"""Operational routes: `/health` (200 only when an engine answers now) and `/metrics` (Prometheus).

`lora_gateway_engine_up` is not set here: it follows each engine's probes (`gateway/engines/base.py`),
with or without `/health` traffic.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.api.responses import Health, HealthUnavailable, errors, ok
from gateway.engines.base import Engine
from gateway.errors import EngineUnavailableError, GatewayError
from gateway.state import GatewayState

router = APIRouter()


_UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: {**errors(503)[503], "model": HealthUnavailable}}


@router.get("/health", responses={**ok(Health, "An engine answers now."), **_UNAVAILABLE, **errors()})
async def health(request: Request) -> JSONResponse:
    state: GatewayState = request.app.state.gateway
    results = await asyncio.gather(*(_engine_answers(state, e) for e in state.engines))
    engines = [
        {"name": e.name, "state": str(e.status.state), "answers": ok}
        for e, ok in zip(state.engines, results, strict=True)
    ]
    if not any(results):
        raise EngineUnavailableError(
            "No engine is answering.", retry_after_s=state.settings.retry_after_s, extra={"engines": engines}
        )
    return JSONResponse({"status": "ok", "engines": engines})


async def _engine_answers(state: GatewayState, engine: Engine) -> bool:
    if not engine.ready:
        return False
    try:
        return await state.client.get_status(engine.url("/health"), timeout=2.0) == 200
    except GatewayError:
        return False


@router.get(
    "/metrics",
    response_class=Response,  # no media type of its own: the errors stay application/json
    responses={
        200: {
            "description": "Prometheus text format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **errors(),
    },
)
async def metrics(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
