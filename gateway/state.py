"""What the routes share, built once in the app's lifespan (no module-level mutable state)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from gateway.engines.base import Engine
from gateway.engines.client import EngineClient
from gateway.engines.pool import EnginePool
from gateway.metrics import Metrics
from gateway.registry.service import Registry
from gateway.residency import Residency
from gateway.residency.shared import SharedUse
from gateway.routing import Router
from gateway.settings import Settings
from gateway.tenancy.keys import Keyring
from gateway.tenancy.limits import Limiter
from gateway.tenancy.usage import UsageRecorder
from gateway.tracing import Tracing


@dataclass
class GatewayState:
    settings: Settings
    metrics: Metrics
    client: EngineClient
    registry: Registry
    pool: EnginePool
    residency: Residency
    router: Router
    keyring: Keyring  # the inference API keys (gateway/tenancy/keys.py)
    limiter: Limiter  # their limits, counted here or in Redis
    usage: UsageRecorder  # their usage, written to the registry in batches
    shared: SharedUse | None = None  # this gateway's adapter use, published for the others
    tracing: Tracing | None = None  # OpenTelemetry, when the OTEL_* variables ask for it
    access: logging.Logger | None = None  # the access log (gateway/tenancy/access.py)
    started_at: float = field(default_factory=time.time)

    @property
    def engines(self) -> list[Engine]:
        return self.pool.engines
