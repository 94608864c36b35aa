"""What every engine is: a vLLM OpenAI server at a base URL, with a state the gateway keeps current.

An engine's monitor probes `GET /v1/models` (it answers only when vLLM is ready, and it lists the
LoRA adapters vLLM really has). Each successful probe is handed to the listeners with the listed
adapter names, which is how residency notices a restart and reconciles (`gateway/residency/reconcile.py`).
When what the engine had loaded is gone (its process died, it was stopped) or can no longer be known
(unreachable), it tells its state-lost listeners: residency owns that state and clears it; the engine
keeps only its own facts (`EngineStatus`).

`lora_gateway_engine_up` follows the engine's state: set after every probe and every change of state,
1 while it is ready, else 0 (no `/health` traffic needed).

A ready engine leaves routing when a probe finds its port closed (the server is gone), or after
`unhealthy_after` probes in a row failed otherwise (timed out, errors): a vLLM busy enough to answer
one probe late is still serving, and taking it out would turn its slowness into 503s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.engines.client import EngineClient
from gateway.errors import EngineUnreachableError, GatewayError
from gateway.metrics import Metrics

log = logging.getLogger("lora_gateway.engine")


class EngineState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNAVAILABLE = "unavailable"
    STOPPED = "stopped"


@dataclass
class ProbeResult:
    adapters: set[str]
    # time.monotonic() when the listing was asked for: loads and unloads after it may be missing from it
    started_at: float = field(default_factory=time.monotonic)


ProbeListener = Callable[["Engine", ProbeResult], Awaitable[None]]
StateLostListener = Callable[["Engine", str], None]  # (engine, why): what it had loaded is gone


@dataclass
class EngineStatus:
    """The engine's own facts: state, health and load. What is loaded there is residency's
    (`Residency.view(engine)`)."""

    state: EngineState = EngineState.STARTING
    generation: int = 0  # bumped each time the engine (re)becomes ready
    ready_since: float | None = None
    last_error: str | None = None
    restarts: int = 0
    active: int = 0  # requests in flight through this gateway, base model included
    waiting: float = 0.0  # vLLM's own queue (vllm:num_requests_waiting), read at each probe
    running: float = 0.0  # vllm:num_requests_running
    cooldown_until: float = 0.0  # monotonic time; refused a connection: skipped until then
    failed_probes: int = 0  # in a row


class Engine:
    """Base class: state, probing, listeners. Subclasses decide how the server comes to exist."""

    kind = "engine"

    def __init__(
        self,
        name: str,
        base_url: str,
        client: EngineClient,
        *,
        probe_interval_s: float,
        unhealthy_after: int = 3,
        metrics: Metrics | None = None,
        api_key: str | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.client = client
        if api_key:  # vLLM's --api-key: the client sends it on every call to this engine
            client.authorize(self.base_url, api_key)
        self.probe_interval_s = probe_interval_s
        self.unhealthy_after = unhealthy_after
        self.probe_timeout_s = 5.0
        self._refused = False  # the last failed probe found nothing listening
        self.status = EngineStatus()
        self._listeners: list[ProbeListener] = []
        self._lost_listeners: list[StateLostListener] = []
        self._up = metrics.engine_up.labels(name) if metrics is not None else None
        self._observe_up()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # --- lifecycle -------------------------------------------------------------------------------
    def add_listener(self, listener: ProbeListener) -> None:
        self._listeners.append(listener)

    def add_state_lost_listener(self, listener: StateLostListener) -> None:
        self._lost_listeners.append(listener)

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"engine-{self.name}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._shutdown()
        self._set_state(EngineState.STOPPED)
        self.state_lost("stopped")

    async def _run(self) -> None:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        """Release what the engine owns (a managed process)."""

    # --- state -----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.status.state == EngineState.READY

    @property
    def available(self) -> bool:
        """Ready, and not cooling down after a refused connection: routing may pick it."""
        return self.ready and time.monotonic() >= self.status.cooldown_until

    @property
    def load(self) -> float:
        return self.status.active + self.status.waiting

    def cool_down(self, seconds: float, error: str) -> None:
        """Leave this engine out of routing for a while (its next successful probe after that restores it)."""
        self.status.cooldown_until = time.monotonic() + seconds
        self.status.last_error = error
        log.warning("engine %s left out of routing for %.0f s: %s", self.name, seconds, error)

    def url(self, path: str) -> str:
        return self.base_url + path

    def _set_state(self, state: EngineState, error: str | None = None) -> None:
        previous = self.status.state
        if state == previous:
            return
        self.status.state = state
        if error:
            self.status.last_error = error
        if state == EngineState.READY:
            self.status.generation += 1
            self.status.ready_since = time.time()
            log.info(
                "engine %s is ready at %s (generation %d)", self.name, self.base_url, self.status.generation
            )
        else:
            self.status.ready_since = None
            if previous == EngineState.READY:
                log.warning("engine %s is %s%s", self.name, state, f": {error}" if error else "")
        self._observe_up()

    def _observe_up(self) -> None:
        if self._up is not None:
            self._up.set(1 if self.ready else 0)

    def mark_down(self, error: str) -> None:
        """The engine lost its state (process died): unavailable, and nothing it had loaded is left."""
        self._set_state(EngineState.UNAVAILABLE, error)
        self.state_lost(error)

    def state_lost(self, reason: str) -> None:
        """Tell the state-lost listeners that what this engine had loaded is gone or unknown."""
        for listener in self._lost_listeners:
            try:
                listener(self, reason)
            except Exception:  # a listener's failure must not stop the monitor
                log.exception("engine %s: state-lost listener failed", self.name)

    # --- probing ---------------------------------------------------------------------------------
    async def probe(self, timeout: float | None = None) -> ProbeResult | None:
        timeout = self.probe_timeout_s if timeout is None else timeout
        started = time.monotonic()
        self._refused = False
        try:
            data = await self.client.get_json(self.url("/v1/models"), timeout=timeout)
        except GatewayError as exc:
            self.status.last_error = exc.message
            self._refused = isinstance(exc, EngineUnreachableError) and exc.refused
            return None
        except ValueError as exc:  # not JSON: not a vLLM server (yet)
            self.status.last_error = f"bad /v1/models answer: {exc}"
            return None
        adapters = listed_adapters(data)
        if adapters is None:  # answered, but not a listing we can trust: as bad as no answer
            shown = repr(data)[:200]
            self.status.last_error = f"bad /v1/models answer: not a list of models with string ids: {shown}"
            log.warning("engine %s: %s", self.name, self.status.last_error)
            return None
        await self._read_queue(timeout)
        return ProbeResult(adapters, started)

    async def _read_queue(self, timeout: float) -> None:
        """vLLM's scheduler queue, from its Prometheus metrics (best effort: absent on other servers)."""
        try:
            status, text = await self.client.get_text(self.url("/metrics"), timeout=timeout)
        except GatewayError:
            return
        if status != 200:
            return
        self.status.waiting = _metric_sum(text, "vllm:num_requests_waiting")
        self.status.running = _metric_sum(text, "vllm:num_requests_running")

    async def probe_once(self) -> bool:
        """Probe, update the state, tell the listeners. True when the engine answered."""
        try:
            result = await self.probe()
        except Exception as exc:  # a bug reading an answer must not stop the monitor: a failed probe
            log.exception("engine %s: probe failed unexpectedly", self.name)
            self.status.last_error = f"probe failed: {exc!r}"
            result = None
        if result is None:
            self.status.failed_probes += 1
            if self.status.state == EngineState.READY:
                if self._refused or self.status.failed_probes >= self.unhealthy_after:
                    self._set_state(EngineState.UNAVAILABLE, self.status.last_error)
                else:
                    log.warning(
                        "engine %s: probe %d of %d failed, still routing to it: %s",
                        self.name,
                        self.status.failed_probes,
                        self.unhealthy_after,
                        self.status.last_error,
                    )
            self._observe_up()
            return False
        self.status.failed_probes = 0
        self._set_state(EngineState.READY)
        self._observe_up()
        for listener in self._listeners:
            try:
                await listener(self, result)
            except Exception:  # a listener's failure must not stop the monitor
                log.exception("engine %s: probe listener failed", self.name)
        return True

    def describe(self) -> dict[str, object]:
        s = self.status
        return {
            "name": self.name,
            "kind": self.kind,
            "url": self.base_url,
            "state": str(s.state),
            "generation": s.generation,
            "ready_since": s.ready_since,
            "restarts": s.restarts,
            "last_error": s.last_error,
            "active_requests": s.active,
            "queue_waiting": s.waiting,
            "queue_running": s.running,
            "cooling_down": time.monotonic() < s.cooldown_until,
            "failed_probes": s.failed_probes,
        }


def listed_adapters(data: object) -> set[str] | None:
    """The adapters in a `/v1/models` answer (entries with a `parent`), or None when it is malformed:
    `data` not a list, or an entry that is not an object with a string `id`."""
    models = data.get("data", []) if isinstance(data, dict) else None
    if not isinstance(models, list):
        return None
    adapters: set[str] = set()
    for model in models:
        if not isinstance(model, dict) or not isinstance(model.get("id"), str):
            return None
        if model.get("parent"):
            adapters.add(model["id"])
    return adapters


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return total
