"""An engine someone else runs (`--engine-url`): the gateway only probes it and follows its state."""

from __future__ import annotations

import asyncio

from gateway.engines.base import Engine, EngineState


class AttachedEngine(Engine):
    kind = "attached"

    async def _run(self) -> None:
        while not self._stopping:
            answered = await self.probe_once()
            if not answered and self.status.state == EngineState.STARTING:
                pass  # never seen ready yet: stay STARTING (503 "not ready")
            elif not answered and not self.ready:  # we cannot know what survives; reconcile on return
                self.state_lost(self.status.last_error or "unavailable")
            await asyncio.sleep(self.probe_interval_s if answered else min(self.probe_interval_s, 1.0))
