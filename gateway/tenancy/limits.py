"""Per-key limits: requests and tokens per minute, requests in flight. Counted in this process, or shared by
every gateway on one Redis (`limits.redis_url`).

Windows are calendar minutes (`int(now // 60)`), the same on every gateway: a key with
`requests_per_minute: 60` starts at most 60 requests between hh:mm:00 and hh:mm:59, on all the gateways
together; Retry-After is the time to the window's end. (A sliding window would smooth the edge, where up
to twice the limit can start within one second across two windows; a fixed one is exact, one counter per
key and minute, and what OpenAI's and LiteLLM's per-minute limits do.) Tokens are counted as they become
known, when each request ends (prompt plus completion, from the engine's usage): a request is admitted
while the minute's tokens are below the limit, so a long answer can take a key past it, and the next
requests wait for the next minute.

`admit()` checks every limit the key has and counts the request only if all of them admit it, at once:
one Lua script in Redis (atomic there), no await between check and count here. Concurrency in Redis is a
sorted set of admission ids scored by their start: `release()` removes its id, and ids older than
`stale_after_s` (a gateway that died holding them) are dropped by the next admit, so a crash frees its
slots after at most that long instead of holding them forever.

`release()` and `add_tokens()` run in a request's finish, a plain callback: they do not block. In Redis
they become tasks (kept until done; `aclose()` awaits them); tokens are written in batches every 50 ms
(one pipeline for every key), so a request costs one round trip to Redis (its admission) plus its release
when it has a concurrency limit: about 130 µs of the gateway's CPU per round trip with redis-py on the 2-core
dev VM (loadtest/overhead/tenancy_cpu.py). Redis unreachable: `on_error="allow"` admits
(a warning every 30 s at most, counted in `errors`), `"deny"` raises `LimiterUnavailable` (a 503). After a
failure, admissions do not try Redis again for `retry_down_s` (1 s): a Redis that is away (a connect timeout
of 0.5 s) delays one request a second, not every one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from gateway.settings import KeyLimits

log = logging.getLogger("lora_gateway.limits")

WINDOW_S = 60
WINDOW_TTL_S = 2 * WINDOW_S


class RateLimited(Exception):
    def __init__(self, limit: str, retry_after_s: int, message: str) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.message = message


class LimiterUnavailable(Exception):
    """The shared counters cannot be reached and `on_error` is deny."""


@dataclass
class Admission:
    key: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    concurrent: bool = False  # counted in flight (the key has max_concurrent)
    released: bool = False


class Limiter(Protocol):
    async def admit(self, key: str, limits: KeyLimits) -> Admission: ...
    def release(self, admission: Admission) -> None: ...
    def add_tokens(self, key: str, tokens: int) -> None: ...
    async def aclose(self) -> None: ...


def _refusal(key: str, limit: str, value: int, retry_after_s: int) -> RateLimited:
    what = {
        "requests_per_minute": f"{value} requests per minute",
        "tokens_per_minute": f"{value} tokens per minute",
        "max_concurrent": f"{value} concurrent requests",
    }[limit]
    return RateLimited(
        limit,
        retry_after_s,
        f"Rate limit reached for API key `{key}`: {what}. Retry after {retry_after_s} s.",
    )


def _to_window_end(now: float) -> int:
    return max(1, math.ceil((int(now // WINDOW_S) + 1) * WINDOW_S - now))


class LocalLimiter:
    """This process's counts alone."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._window = -1
        self._requests: dict[str, int] = defaultdict(int)
        self._tokens: dict[str, int] = defaultdict(int)
        self._in_flight: dict[str, int] = defaultdict(int)

    def _roll(self, now: float) -> None:
        window = int(now // WINDOW_S)
        if window != self._window:
            self._window = window
            self._requests.clear()
            self._tokens.clear()

    async def admit(self, key: str, limits: KeyLimits) -> Admission:
        now = self.clock()
        self._roll(now)
        rpm, tpm, conc = limits.requests_per_minute, limits.tokens_per_minute, limits.max_concurrent
        if rpm is not None and self._requests[key] >= rpm:
            raise _refusal(key, "requests_per_minute", rpm, _to_window_end(now))
        if tpm is not None and self._tokens[key] >= tpm:
            raise _refusal(key, "tokens_per_minute", tpm, _to_window_end(now))
        if conc is not None and self._in_flight[key] >= conc:
            raise _refusal(key, "max_concurrent", conc, 1)
        self._requests[key] += 1
        if conc is not None:
            self._in_flight[key] += 1
        return Admission(key, concurrent=conc is not None)

    def release(self, admission: Admission) -> None:
        if admission.released:
            return
        admission.released = True
        if admission.concurrent:
            self._in_flight[admission.key] -= 1

    def add_tokens(self, key: str, tokens: int) -> None:
        self._roll(self.clock())
        self._tokens[key] += tokens

    async def aclose(self) -> None:
        return None


# KEYS: rpm counter, tpm counter, in-flight set. ARGV: rpm, tpm, conc (0 = none), now, stale_before, id,
# the window keys' TTL, the in-flight set's TTL.
# Returns 0 when admitted, else 1 (rpm), 2 (tpm), 3 (concurrency).
_ADMIT = """
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if rpm > 0 and tonumber(redis.call('GET', KEYS[1]) or '0') >= rpm then return 1 end
if tpm > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= tpm then return 2 end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[5])
  if redis.call('ZCARD', KEYS[3]) >= conc then return 3 end
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[6])
  redis.call('EXPIRE', KEYS[3], ARGV[8])
end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 0
"""
_CODES = {1: "requests_per_minute", 2: "tokens_per_minute", 3: "max_concurrent"}


class RedisLimiter:
    """Counts in Redis, shared by every gateway using the same `prefix` there."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "lora-gateway:",
        on_error: Literal["allow", "deny"] = "allow",
        stale_after_s: float = 900.0,
        token_batch_s: float = 0.05,
        retry_down_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        self.on_error = on_error
        self.stale_after_s = stale_after_s
        self.clock = clock
        self.errors = 0
        self._warned_at = -math.inf
        self._redis: Any = aioredis.Redis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=1.0, health_check_interval=30
        )
        self._script = self._redis.register_script(_ADMIT)
        self._pending: set[asyncio.Task[None]] = set()
        self.token_batch_s = token_batch_s
        self.retry_down_s = retry_down_s
        self._down_until = -math.inf  # after a failure, admissions skip Redis until then
        self._tokens: dict[str, int] = {}  # tokens counted here, not yet written (Redis key -> tokens)
        self._flush: asyncio.TimerHandle | None = None

    def _keys(self, key: str, window: int) -> list[str]:
        p = self.prefix
        return [f"{p}rpm:{key}:{window}", f"{p}tpm:{key}:{window}", f"{p}inflight:{key}"]

    def _failed(self, exc: object) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._warned_at >= 30:
            self._warned_at = now
            log.warning(
                "rate limiter: Redis at %s failed (%s); on_redis_error=%s", self.url, exc, self.on_error
            )

    async def admit(self, key: str, limits: KeyLimits) -> Admission:
        now = self.clock()
        window = int(now // WINDOW_S)
        admission = Admission(key, concurrent=limits.max_concurrent is not None)
        args: list[str | int | float] = [
            limits.requests_per_minute or 0,
            limits.tokens_per_minute or 0,
            limits.max_concurrent or 0,
            now,
            now - self.stale_after_s,
            admission.id,
            WINDOW_TTL_S,
            math.ceil(self.stale_after_s),
        ]
        if time.monotonic() < self._down_until:  # it failed a moment ago: do not make every request wait
            return self._unavailable(admission, "it failed less than retry_down_s ago")
        try:
            code = int(await self._script(keys=self._keys(key, window), args=args))
        except Exception as exc:  # redis.RedisError, OSError, timeouts
            self._down_until = time.monotonic() + self.retry_down_s
            return self._unavailable(admission, exc)
        if code:
            limit = _CODES[code]
            value = {1: limits.requests_per_minute, 2: limits.tokens_per_minute, 3: limits.max_concurrent}[
                code
            ]
            retry = 1 if code == 3 else _to_window_end(now)
            raise _refusal(key, limit, int(value or 0), retry)
        return admission

    def _unavailable(self, admission: Admission, why: object) -> Admission:
        """Redis failed: admit (nothing counted, nothing to give back) or, with on_error deny, refuse."""
        self._failed(why)
        if self.on_error == "deny":
            raise LimiterUnavailable(f"Redis at {self.url}: {why}")
        admission.concurrent = False
        return admission

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def release(self, admission: Admission) -> None:
        if admission.released:
            return
        admission.released = True
        if admission.concurrent:
            self._spawn(
                self._guarded(self._redis.zrem(f"{self.prefix}inflight:{admission.key}", admission.id))
            )

    def add_tokens(self, key: str, tokens: int) -> None:
        """Added to this minute's count in batches (one pipeline every `token_batch_s`), not one round trip
        per request: the count is read only by the next admissions, and each batch is small."""
        if tokens <= 0:
            return
        counter = self._keys(key, int(self.clock() // WINDOW_S))[1]
        self._tokens[counter] = self._tokens.get(counter, 0) + tokens
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self.token_batch_s, self._write_tokens)

    def _write_tokens(self) -> None:
        self._flush = None
        batch, self._tokens = self._tokens, {}
        if batch:
            self._spawn(self._guarded(self._add(batch)))

    async def _add(self, batch: dict[str, int]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for counter, tokens in batch.items():
                pipe.incrby(counter, tokens)
                pipe.expire(counter, WINDOW_TTL_S)
            await pipe.execute()

    async def _guarded(self, work: Any) -> None:
        try:
            await work
        except Exception as exc:
            self._failed(exc)

    async def aclose(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
        self._write_tokens()
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        await self._redis.aclose()


def open_limiter(
    redis_url: str | None,
    *,
    prefix: str = "lora-gateway:",
    on_error: Literal["allow", "deny"] = "allow",
) -> Limiter:
    if redis_url:
        return RedisLimiter(redis_url, prefix=prefix, on_error=on_error)
    return LocalLimiter()
