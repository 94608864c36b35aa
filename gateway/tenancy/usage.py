"""Usage accounting: requests and tokens per key x model x version x hour, kept in the registry database.

`UsageRecorder.add()` runs in a request's finish and only adds to a dict in memory; `run()` writes what
was added every `interval_s` in one transaction (`RegistryStore.add_usage`, which adds to the stored
rows: several gateways, or `serve --workers` processes, write their own counts into the same rows), off
the request path, in a thread. A failed write keeps its counts for the next one; `close()` (at shutdown,
after the last request finished) writes the rest, so a clean shutdown loses nothing. A crash loses at
most the last `interval_s` of counts.

What is counted: every request that was admitted (its key allowed the model and it was within the key's
limits) and resolved to a registered model; its tokens are the engine's `usage` (what the client was
told, or would have been: the gateway asks vLLM for a stream's usage event even when the client did not).
A request refused before that (401, 403, 404, 429, 400) spends nothing and is not a usage row; the
access log and the per-key metrics show it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.registry.store import RegistryStore, UsageRow

log = logging.getLogger("lora_gateway.usage")

Bucket = tuple[str, str, int, int]  # key, model, version, hour


class UsageRecorder:
    def __init__(
        self, store: RegistryStore, *, interval_s: float = 5.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.interval_s = interval_s
        self.clock = clock
        self._pending: dict[Bucket, list[int]] = {}
        self._lock = asyncio.Lock()  # one write at a time (run() and close())

    def add(self, key: str, model: str, version: int, prompt_tokens: int, completion_tokens: int) -> None:
        hour = int(self.clock() // 3600 * 3600)
        counts = self._pending.setdefault((key, model, version, hour), [0, 0, 0])
        counts[0] += 1
        counts[1] += prompt_tokens
        counts[2] += completion_tokens

    async def flush(self) -> int:
        """Write what was added so far; on failure put it back (merged with what came meanwhile)."""
        async with self._lock:
            batch, self._pending = self._pending, {}
            if not batch:
                return 0
            rows = [UsageRow(k, m, v, h, *counts) for (k, m, v, h), counts in batch.items()]
            write = asyncio.ensure_future(asyncio.to_thread(self.store.add_usage, rows))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:  # the thread writes on: wait for it, so nothing counts twice
                await asyncio.wait([write])
                if write.exception() is not None:
                    self._restore(batch)
                raise
            except Exception:
                self._restore(batch)
                raise
            return len(rows)

    def _restore(self, batch: dict[Bucket, list[int]]) -> None:
        for bucket, counts in batch.items():
            mine = self._pending.setdefault(bucket, [0, 0, 0])
            for i in range(3):
                mine[i] += counts[i]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except Exception:
                log.exception("writing usage failed; kept for the next write")

    async def close(self) -> None:
        try:
            await self.flush()
        except Exception:
            log.exception("writing the last usage at shutdown failed: %d row(s) lost", len(self._pending))
