"""What the other gateways on the same engines are using: residency coordinated through the registry.

Several gateways (`serve --workers N`, replicas of a Deployment) attached to one vLLM each decide what
to evict. Alone, each sees only its own requests: the adapters another gateway loaded have no age in
its LRU (so they are evicted first) and their requests are not in its in-flight counts, so each one
unloaded what the other had just loaded (measured: 1.8x the loads of one gateway). Here every gateway
publishes, per engine and adapter, its requests in flight and its last use into the registry database
they already share (`adapter_uses`, `store.py`), and reads the others' before it chooses a victim:

    request path    touch(engine, adapter, in_flight, now): a dict write, nothing else
    publisher       every `interval_s` the changed rows in one transaction (off the request path);
                    rows with requests in flight again every `heartbeat_s`, so they stay fresh
    loading         announce(engine, adapter): published at once; a gateway needing the same adapter
                    waits for vLLM to list it instead of making room for a second load
    making room     others(engine): in flight on other gateways (rows seen within `stale_after_s`:
                    a gateway that died stops counting) and their last use; policy.py merges them;
                    read again `confirm_s` later, just before unloading the victim

Why the registry and not the engine as the judge: vLLM's view of what runs
(`vllm:lora_requests_info`) is of its latest step, says nothing of recency (an adapter between two
requests looks unused), and on a busy engine its `/metrics` answers seconds late; the registry is
already shared by every gateway that shares adapters, and a batch every 25 ms is cheap for it.
What it cannot prevent: a request another gateway admitted less than `interval_s` ago is not yet
published; if its adapter is evicted meanwhile, vLLM answers 404 and that gateway loads it again
(the reload path every gateway has), so answers stay right and only a load is spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.registry.store import AdapterUse, RegistryStore

log = logging.getLogger("lora_gateway.residency")


@dataclass(frozen=True)
class OthersUse:
    """The other gateways' use of one engine's adapters: requests in flight now and last use."""

    in_flight: dict[str, int]
    last_used: dict[str, float]
    gateways: frozenset[str] = frozenset()  # the other gateways seen on this engine within stale_after_s


NOBODY = OthersUse({}, {})


def gateway_id() -> str:
    """This gateway's name in `adapter_uses`: host, process and a random part (a restarted process on
    the same host with the same pid is another gateway)."""
    return f"{socket.gethostname()}~{os.getpid()}~{secrets.token_hex(3)}"


class SharedUse:
    def __init__(
        self,
        store: RegistryStore,
        *,
        gateway: str | None = None,
        interval_s: float = 0.025,
        heartbeat_s: float = 2.0,
        stale_after_s: float = 10.0,
        expire_after_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.gateway = gateway or gateway_id()
        self.interval_s = interval_s
        self.confirm_s = 4 * interval_s  # an eviction looks again this much later (leases.py)
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.expire_after_s = expire_after_s
        self._clock = clock
        # (engine, adapter) -> (in flight, last use)
        self._mine: dict[tuple[str, str], tuple[int, float]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._changed = asyncio.Event()
        self._writing = asyncio.Lock()  # one batch at a time: a later batch never lands before an earlier one
        self._last_heartbeat = 0.0

    def touch(self, engine: str, adapter: str, in_flight: int, last_used: float | None = None) -> None:
        """This gateway's use changed (a lease taken or given back); published within `interval_s`."""
        key = (engine, adapter)
        if last_used is None:
            last_used = self._mine.get(key, (0, 0.0))[1]
        self._mine[key] = (in_flight, last_used)
        self._dirty.add(key)
        self._changed.set()

    async def announce(self, engine: str, adapter: str, in_flight: int) -> None:
        """This gateway starts loading `adapter` (for `in_flight` requests): published now, so that the
        others wait for the load instead of making room for one of their own."""
        self.touch(engine, adapter, in_flight, self._clock())
        try:
            await self.publish()
        except Exception as exc:  # the registry is down: the load goes on, the publisher tries again
            log.warning("publishing this gateway's adapter use failed: %s", exc)

    async def others(self, engine: str) -> OthersUse:
        """What the other gateways use on `engine` (nothing, if the registry cannot be read now)."""
        try:
            rows = await asyncio.to_thread(self.store.read_uses, engine)
        except Exception as exc:  # the registry is down: decide alone, as before coordination
            log.warning("reading the other gateways' adapter use failed: %s", exc)
            return NOBODY
        return self.merge(rows)

    def merge(self, rows: list[AdapterUse]) -> OthersUse:
        fresh_since = self._clock() - self.stale_after_s
        in_flight: dict[str, int] = {}
        last_used: dict[str, float] = {}
        gateways: set[str] = set()
        for row in rows:
            if row.gateway == self.gateway:
                continue
            if row.seen_at >= fresh_since:
                gateways.add(row.gateway)
                if row.in_flight > 0:
                    in_flight[row.adapter] = in_flight.get(row.adapter, 0) + row.in_flight
            last_used[row.adapter] = max(last_used.get(row.adapter, 0.0), row.last_used)
        return OthersUse(in_flight, last_used, frozenset(gateways))

    def _due(self) -> list[AdapterUse]:
        now = self._clock()
        keys = set(self._dirty)
        if now - self._last_heartbeat >= self.heartbeat_s:
            self._last_heartbeat = now
            keys |= {key for key, (n, _) in self._mine.items() if n > 0}
        self._dirty.clear()
        return [AdapterUse(e, a, self.gateway, *self._mine[(e, a)], seen_at=now) for e, a in sorted(keys)]

    async def publish(self) -> None:
        """Write what changed (and the heartbeat of busy rows) now; on failure it stays due."""
        async with self._writing:
            await self._publish()

    async def _publish(self) -> None:
        uses = self._due()
        if not uses:
            return
        try:
            expire_before = self._clock() - self.expire_after_s
            await asyncio.to_thread(self.store.publish_uses, uses, expire_before=expire_before)
        except BaseException:
            self._dirty.update((u.engine, u.adapter) for u in uses)
            raise
        for u in uses:  # an idle row, once written, needs no heartbeat: forget it unless it changed since
            key = (u.engine, u.adapter)
            if u.in_flight == 0 and key not in self._dirty and self._mine.get(key) == (0, u.last_used):
                del self._mine[key]

    async def run(self) -> None:
        """The publisher: a batch at most every `interval_s` while leases change, heartbeats between."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=self.heartbeat_s)
            self._changed.clear()
            try:
                await self.publish()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the registry is down: the next batch tries again
                log.warning("publishing this gateway's adapter use failed: %s", exc)
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        """A clean stop: this gateway's rows go (its requests are over)."""
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.store.forget_uses, self.gateway)
