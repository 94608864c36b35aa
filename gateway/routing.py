"""Choosing the engine (vLLM replica) for one request.

`affinity` (the default), in order:

1. base-model requests: the least loaded replica;
2. the adapter is resident somewhere (and not draining there, see `gateway/residency/`): the least
   loaded of those replicas (affinity), unless all of them are saturated (load >= `spread_at`) and
   another replica with a free adapter slot is less loaded: then the hot adapter spreads there;
3. the adapter is cold: a replica with a free slot, else any; among the least loaded ones (within
   `slack`), the adapter's rendezvous-hash favourite, so a cold adapter keeps going to the same
   replica instead of being loaded on (and evicting from) every replica in turn.

What is resident where is read from residency (`Residency.view(engine)`), never written here.
Load = requests in flight through this gateway (each holds a `Slot` from `take`) + vLLM's own waiting
queue (read at each probe).
`round_robin` ignores all that; it is the baseline the load tests compare against.
No replica available: 503 with Retry-After, which the OpenAI SDKs retry.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Collection, Sequence

from gateway.engines.base import Engine
from gateway.errors import EngineUnavailableError
from gateway.registry.catalog import Target
from gateway.residency.state import EngineResidency, ResidencyView


def _rendezvous(key: str, engine: Engine) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{engine.name}".encode(), digest_size=8).digest(), "big")


class Slot:
    """One request's place on one engine: counted in the engine's `active` (its load) until released;
    `release()` is idempotent."""

    __slots__ = ("engine", "_released")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._released = False
        engine.status.active += 1

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.engine.status.active -= 1


class Router:
    def __init__(
        self,
        engines: Callable[[], Sequence[Engine]] | Sequence[Engine],
        *,
        retry_after_s: int,
        max_resident: int,
        policy: str = "affinity",
        spread_at: float = 8.0,
        slack: float = 2.0,
        residency: Callable[[Engine], ResidencyView] | None = None,
    ) -> None:
        self._engines = engines if callable(engines) else (lambda: engines)
        # What each engine has loaded (`Residency.view`); without it, no adapter is resident anywhere.
        nothing = ResidencyView(EngineResidency())
        self._residency = residency or (lambda _: nothing)
        self.retry_after_s = retry_after_s
        self.max_resident = max_resident
        self.policy = policy
        self.spread_at = spread_at
        self.slack = slack
        self._rr = itertools.count()

    @property
    def engines(self) -> list[Engine]:
        return list(self._engines())

    def take(self, target: Target, exclude: Collection[Engine] = ()) -> Slot:
        """A slot on the engine `pick` chooses: the request counts in that engine's load until released."""
        return Slot(self.pick(target, exclude))

    def pick(self, target: Target, exclude: Collection[Engine] = ()) -> Engine:
        engines = self.engines
        ready = [e for e in engines if e.available and e not in exclude]
        if not ready:
            states = ", ".join(f"{e.name}: {e.status.state}" for e in engines) or "none configured"
            raise EngineUnavailableError(
                f"No engine is ready to serve requests ({states}); try again shortly.",
                retry_after_s=self.retry_after_s,
                code="engine_not_ready",
            )
        if self.policy == "round_robin":
            return ready[next(self._rr) % len(ready)]
        if target.adapter is None:
            return self._least_loaded(ready)
        key = target.adapter.engine_name
        warm = [e for e in ready if self._residency(e).takes(key)]
        if warm:
            best = self._least_loaded(warm)
            if best.load < self.spread_at:
                return best
            spare = [e for e in ready if e not in warm and self._has_free_slot(e)]
            if spare:
                other = self._least_loaded(spare)
                if other.load < best.load:
                    return other
            return best
        pool = [e for e in ready if self._has_free_slot(e)] or ready
        floor = min(e.load for e in pool)
        near = [e for e in pool if e.load <= floor + self.slack]
        return max(near, key=lambda e: _rendezvous(key, e))

    def _least_loaded(self, engines: Sequence[Engine]) -> Engine:
        start = next(self._rr) % len(engines)  # rotate ties, so equal replicas share the work
        rotated = list(engines[start:]) + list(engines[:start])
        return min(rotated, key=lambda e: e.load)

    def _has_free_slot(self, engine: Engine) -> bool:
        return self._residency(engine).resident_count < self.max_resident
