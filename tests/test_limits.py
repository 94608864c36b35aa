"""Per-key limits (gateway/tenancy/limits.py): counted in this process, and shared through a real Redis
(tests/redis_server.py). Time is driven, so windows and stale admissions are exact."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest

from gateway.settings import KeyLimits
from gateway.tenancy.limits import LimiterUnavailable, LocalLimiter, RateLimited, RedisLimiter
from loadtest.servers.serving import free_port


class Clock:
    def __init__(self, now: float = 6_000_000.0) -> None:  # a window's start (a multiple of 60)
        self.now = now

    def __call__(self) -> float:
        return self.now


def limiter_factory(kind: str, redis_url: str | None) -> Callable[[Clock], LocalLimiter | RedisLimiter]:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    if kind == "local":
        return lambda clock: LocalLimiter(clock=clock)
    assert redis_url is not None
    return lambda clock: RedisLimiter(redis_url, prefix=prefix, clock=clock)


@pytest.fixture(params=["local", "redis"])
def make(request: pytest.FixtureRequest) -> Callable[[Clock], LocalLimiter | RedisLimiter]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return limiter_factory(request.param, url)


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_requests_per_minute_is_exact_and_resets_with_the_window(make) -> None:  # noqa: ANN001
    async def main() -> None:
        clock = Clock()
        lim = make(clock)
        limits = KeyLimits(requests_per_minute=5)
        for _ in range(5):
            await lim.admit("a", limits)
        clock.now += 17.2
        with pytest.raises(RateLimited) as info:
            await lim.admit("a", limits)
        assert info.value.limit == "requests_per_minute" and info.value.retry_after_s == 43
        assert "5 requests per minute" in info.value.message
        await lim.admit("b", limits)  # per key
        clock.now += 43
        await lim.admit("a", limits)  # the next minute
        await lim.aclose()

    run(main())


def test_tokens_per_minute(make) -> None:  # noqa: ANN001
    async def main() -> None:
        clock = Clock()
        lim = make(clock)
        limits = KeyLimits(tokens_per_minute=100)
        await lim.admit("a", limits)
        lim.add_tokens("a", 60)
        await asyncio.sleep(0.2)  # Redis: written in batches every 50 ms
        await lim.admit("a", limits)  # 60 < 100: admitted, and its answer takes the key past the limit
        lim.add_tokens("a", 60)
        await asyncio.sleep(0.2)  # Redis: written in batches every 50 ms
        with pytest.raises(RateLimited) as info:
            await lim.admit("a", limits)
        assert info.value.limit == "tokens_per_minute" and info.value.retry_after_s == 60
        await lim.aclose()

    run(main())


def test_concurrency_release_and_none_limits(make) -> None:  # noqa: ANN001
    async def main() -> None:
        lim = make(Clock())
        limits = KeyLimits(max_concurrent=2)
        first, _second = await lim.admit("a", limits), await lim.admit("a", limits)
        with pytest.raises(RateLimited) as info:
            await lim.admit("a", limits)
        assert info.value.limit == "max_concurrent" and info.value.retry_after_s == 1
        lim.release(first)
        lim.release(first)  # twice is harmless
        await asyncio.sleep(0.05)
        await lim.admit("a", limits)
        with pytest.raises(RateLimited):
            await lim.admit("a", limits)
        for _ in range(50):
            await lim.admit("free", KeyLimits())
        await lim.aclose()

    run(main())


def test_two_gateways_share_one_limit_through_redis(redis_url: str) -> None:
    async def main() -> None:
        clock = Clock()
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        one, two = (RedisLimiter(redis_url, prefix=prefix, clock=clock) for _ in range(2))
        limits = KeyLimits(requests_per_minute=10)
        admitted = 0
        for i in range(15):
            try:
                await (one, two)[i % 2].admit("a", limits)
                admitted += 1
            except RateLimited:
                pass
        assert admitted == 10
        # At once: 50 admits against 20, all racing.
        results = await asyncio.gather(
            *((one, two)[i % 2].admit("b", KeyLimits(requests_per_minute=20)) for i in range(50)),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, Exception) for r in results) == 20
        assert all(isinstance(r, RateLimited) for r in results if isinstance(r, Exception))
        await one.aclose()
        await two.aclose()

    run(main())


def test_a_crashed_gateways_admissions_expire(redis_url: str) -> None:
    async def main() -> None:
        clock = Clock()
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        crashed = RedisLimiter(redis_url, prefix=prefix, clock=clock, stale_after_s=300)
        limits = KeyLimits(max_concurrent=1)
        await crashed.admit("a", limits)  # never released: its gateway died
        survivor = RedisLimiter(redis_url, prefix=prefix, clock=clock, stale_after_s=300)
        with pytest.raises(RateLimited):
            await survivor.admit("a", limits)
        clock.now += 301
        await survivor.admit("a", limits)
        await crashed.aclose()
        await survivor.aclose()

    run(main())


def test_aclose_writes_what_is_pending(redis_url: str) -> None:
    async def main() -> None:
        clock = Clock()
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        first = RedisLimiter(redis_url, prefix=prefix, clock=clock)
        first.add_tokens("a", 500)
        await first.aclose()
        second = RedisLimiter(redis_url, prefix=prefix, clock=clock)
        with pytest.raises(RateLimited):
            await second.admit("a", KeyLimits(tokens_per_minute=500))
        await second.aclose()

    run(main())


def test_redis_unreachable_allow_or_deny() -> None:
    async def main() -> None:
        url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        allow = RedisLimiter(url, on_error="allow")
        admission = await allow.admit("a", KeyLimits(requests_per_minute=1, max_concurrent=1))
        await allow.admit("a", KeyLimits(requests_per_minute=1))
        assert allow.errors == 2
        allow.release(admission)
        allow.add_tokens("a", 5)
        await allow.aclose()  # the failed writes are counted, not raised
        assert allow.errors >= 2
        deny = RedisLimiter(url, on_error="deny")
        with pytest.raises(LimiterUnavailable):
            await deny.admit("a", KeyLimits(requests_per_minute=1))
        await deny.aclose()

    run(main())


def test_after_a_failure_redis_is_left_alone_for_a_moment_then_tried_again(redis_url: str) -> None:
    async def main() -> None:
        lim = RedisLimiter(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:", retry_down_s=0.3)
        real, calls = lim._script, []

        async def failing(**kw):  # noqa: ANN003, ANN202
            calls.append(kw)
            raise ConnectionError("Redis went away")

        lim._script = failing
        limits = KeyLimits(requests_per_minute=1)
        await lim.admit("a", limits)
        await lim.admit("a", limits)
        assert len(calls) == 1 and lim.errors == 2, "the second admission did not wait on Redis again"
        lim._script = real  # it is back
        await asyncio.sleep(0.35)
        await lim.admit("a", limits)
        with pytest.raises(RateLimited):
            await lim.admit("a", limits)  # counted again
        await lim.aclose()

    run(main())
