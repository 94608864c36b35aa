"""What the routes share, built once in the app's lifespan (no module-level mutable state)."""

from __future__ import annotations

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


@dataclass
class GatewayState:
    settings: Settings
    metrics: Metrics
    client: EngineClient
    registry: Registry
    pool: EnginePool
    residency: Residency
    router: Router
    shared: SharedUse | None = None  # this gateway's adapter use, published for the others
    started_at: float = field(default_factory=time.time)

    @property
    def engines(self) -> list[Engine]:
        return self.pool.engines
