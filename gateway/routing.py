"""Choosing the engine for one request.

Order: an engine where the adapter is already resident (affinity), then the least loaded ready
engine (requests in flight). No ready engine at all: 503 with Retry-After, the client retries.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.engines.base import Engine
from gateway.errors import EngineUnavailableError
from gateway.registry.catalog import Target


class Router:
    def __init__(self, engines: Sequence[Engine], *, retry_after_s: int) -> None:
        self.engines = list(engines)
        self.retry_after_s = retry_after_s

    def pick(self, target: Target) -> Engine:
        ready = [e for e in self.engines if e.ready]
        if not ready:
            states = ", ".join(f"{e.name}: {e.status.state}" for e in self.engines)
            raise EngineUnavailableError(
                f"No engine is ready to serve requests ({states}); try again shortly.",
                retry_after_s=self.retry_after_s,
                code="engine_not_ready",
            )
        if target.adapter is not None:
            warm = [e for e in ready if target.adapter.engine_name in e.status.resident]
            if warm:
                ready = warm
        return min(ready, key=lambda e: sum(e.status.in_flight.values()))
