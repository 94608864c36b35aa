"""Hot-load and eviction against the real vLLM: more adapters than resident slots, many clients at once.

- N concurrent first requests to one cold adapter cause exactly one load (singleflight), all answered.
- 16 clients spread over 5 adapters with 2 slots, while another adapter is registered and removed over
  and over: no request fails, every answer is the one its adapter gives alone (greedy), an adapter with
  a request in flight is never evicted, and every load is one cold miss: per adapter,
  loads == evictions + (1 if resident at the end), so nothing was loaded twice without leaving first.
- Every slot leased by a stream in flight: a request for another cold adapter waits
  `registry.load_wait_timeout_s`, then gets 503 with Retry-After; the adapter it drained meanwhile
  takes requests again.
- Every slot busy, but the streams end: the cold adapter drains the least busy one, whose new
  requests wait; it loads as soon as that one's stream ends, and the drained adapter loads again.
- More adapters registered (the default `registry.max_resident`) than vLLM keeps in memory
  (`--max-cpu-loras 4`, 2 batch slots): vLLM reads the others from disk inside its own steps; under
  many clients every answer is still its adapter's own, and the gateway loaded each adapter once.
"""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from loadtest.harness.verify import References, request_key
from tests.conftest import ENGINE_AUTH, serve_app
from tests.registry_helpers import (
    PROMPT,
    assert_stopped,
    complete,
    engine,
    held_stream,
    learn,
    metric,
    register,
    registry_settings,
    settled_view,
    text,
    vllm_adapters,
    write_adapter,
)
from tests.test_errors_e2e import assert_openai_error

pytestmark = pytest.mark.engine

ADAPTERS = [f"r{i}" for i in range(5)]
CLIENTS = 16
STORM_S = 12.0
# The storm goes on, 2 s at a time up to this, until the watcher has proved an adapter in flight throughout
# 3 times: under a full suite's load a look (gateway, vLLM's listing, gateway) can take most of a second,
# and 12 s once gave only 1 proof in 15 looks. More time, not a lower bar.
STORM_MAX_S = 40.0
PROOFS = 3
MAX_TOKENS = 6
LONG_TOKENS = 200
LOADS = "lora_gateway_adapter_loads_total"
EVICTIONS = "lora_gateway_adapter_evictions_total"


class Storm:
    """What the clients saw, and what /admin/engines showed meanwhile."""

    def __init__(self) -> None:
        self.answers: list[tuple[str, int, str]] = []  # (model, status, text or error body)
        self.long_answers: list[tuple[str, int, str]] = []  # LONG_TOKENS each, from one client
        self.churn_cycles = 0
        self.violations: list[str] = []
        self.samples = 0
        self.held_throughout = (
            0  # samples where an adapter provably had a request in flight: checked with vLLM
        )
        self.started = time.monotonic()
        self.deadline = self.started + STORM_S  # moved on by the watcher until it has its proofs

    def going(self) -> bool:
        return time.monotonic() < self.deadline


def greedy(model: str) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


async def client_loop(http: httpx.AsyncClient, seed: int, storm: Storm) -> None:
    rng = random.Random(seed)
    while storm.going():
        model = rng.choice(ADAPTERS)
        body = greedy(model)
        r = await http.post("/v1/completions", json=body)
        storm.answers.append(
            (model, r.status_code, r.json()["choices"][0]["text"] if r.is_success else r.text)
        )


async def long_client_loop(http: httpx.AsyncClient, storm: Storm) -> None:
    """Requests that hold their lease far longer than the watcher's look takes (so it can prove something);
    a greedy answer's start is the short answer's, and counts as one of the answers checked."""
    rng = random.Random(-1)
    while storm.going():
        model = rng.choice(ADAPTERS)
        r = await http.post("/v1/completions", json=greedy(model) | {"max_tokens": LONG_TOKENS})
        storm.long_answers.append(
            (model, r.status_code, r.json()["choices"][0]["text"] if r.is_success else r.text)
        )


async def churn_loop(http: httpx.AsyncClient, sources: dict[str, Path], storm: Storm) -> None:
    """Register `churn` from alternating weights, call it, remove it: again and again."""
    while storm.going():
        which = "churn-a" if storm.churn_cycles % 2 == 0 else "churn-b"
        r = await http.post("/admin/adapters", json={"name": "churn", "source": str(sources[which])})
        assert r.status_code == 201, r.text
        body = greedy("churn")
        r = await http.post("/v1/completions", json=body)
        storm.answers.append(
            (which, r.status_code, r.json()["choices"][0]["text"] if r.is_success else r.text)
        )
        r = await http.delete("/admin/adapters/churn")
        assert r.status_code == 200, r.text
        storm.churn_cycles += 1


async def watch_engines(http: httpx.AsyncClient, vllm_url: str, storm: Storm, mine: dict[str, str]) -> None:
    """The gateway's view, then vLLM's listing, then the gateway's view again. An adapter with `c`
    requests in flight at the first look, and fewer than `c` leases released on it by the second, had a
    request in flight the whole time: vLLM must list it in between (it was never evicted)."""
    while storm.going():
        [first] = (await http.get("/admin/engines")).json()["data"]
        listed = {
            m["id"]
            for m in (await http.get(vllm_url + "/v1/models", headers=ENGINE_AUTH)).json()["data"]
            if m.get("parent")
        }
        [second] = (await http.get("/admin/engines")).json()["data"]
        resident = set(first["resident_adapters"])
        busy = set(first["in_flight"])
        if not busy <= resident:
            storm.violations.append(f"in flight but not resident: {busy - resident}")
        for key, count in first["in_flight"].items():
            released = second["leases"][key]["released"] - first["leases"][key]["released"]
            if released < count and key not in listed:
                storm.violations.append(f"{key} had a request in flight throughout, vLLM did not list it")
            storm.held_throughout += released < count
        if len(resident & set(mine.values())) > 2:
            storm.violations.append(f"more than 2 of ours resident: {resident}")
        storm.samples += 1
        near_end = storm.deadline - time.monotonic() < 2.5  # a look can take most of a second
        if near_end and storm.held_throughout < PROOFS and storm.deadline < storm.started + STORM_MAX_S:
            storm.deadline += 2.0
        await asyncio.sleep(0.05)


async def run_storm(url: str, vllm_url: str, sources: dict[str, Path], mine: dict[str, str]) -> Storm:
    storm = Storm()
    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        await asyncio.gather(
            *(client_loop(http, seed, storm) for seed in range(CLIENTS)),
            long_client_loop(http, storm),
            churn_loop(http, sources, storm),
            watch_engines(http, vllm_url, storm, mine),
        )
    return storm


def engine_names(url: str) -> dict[str, str]:
    adapters = httpx.get(url + "/admin/adapters").json()["data"]
    return {a["name"]: v["engine_name"] for a in adapters for v in a["versions"] if v["status"] == "ready"}


def test_singleflight_and_eviction_under_concurrent_clients_and_churn(
    vllm_url: str, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "src"
    for i, name in enumerate([*ADAPTERS, "churn-a", "churn-b"]):
        write_adapter(tiny_cache["base"], root / name, seed=1000 + i)
    registry = {"max_resident": 2, "load_wait_timeout_s": 60}
    # Frequent probes: each one's listing races the loads and evictions going on meanwhile.
    engine_ = {"health_interval_s": 0.05}
    settings = registry_settings(vllm_url, cache_dir, tmp_path, root, registry=registry, engine=engine_)
    with serve_app(settings) as url:
        for name in ADAPTERS:
            register(url, name, root / name)

        # Singleflight: 8 concurrent first requests to a cold adapter, one load.
        with ThreadPoolExecutor(8) as pool:
            first = list(pool.map(lambda _: text(url, "r0", max_tokens=MAX_TOKENS), range(8)))
        assert metric(url, LOADS, adapter="r0") == 1
        assert len(set(first)) == 1

        # Each adapter's own answer, one request at a time; churn's two weights likewise.
        expected = {name: text(url, name, max_tokens=MAX_TOKENS) for name in ADAPTERS}
        for which in ("churn-a", "churn-b"):
            register(url, "churn", root / which)
            expected[which] = text(url, "churn", max_tokens=MAX_TOKENS)
            httpx.delete(url + "/admin/adapters/churn").raise_for_status()
        assert len(set(expected.values())) == len(expected), f"adapters must be told apart: {expected}"
        assert expected["r0"] == first[0]

        mine = engine_names(url)
        storm = asyncio.run(run_storm(url, vllm_url, {n: root / n for n in ("churn-a", "churn-b")}, mine))

        failed = [a for a in storm.answers if a[1] != 200]
        assert not failed, f"{len(failed)} of {len(storm.answers)} failed: {failed[:5]}"
        wrong = [a for a in storm.answers if a[2] != expected[a[0]]]
        assert not wrong, f"{len(wrong)} answers from the wrong adapter: {wrong[:5]}"
        assert storm.long_answers, "the long client finished no request"
        wrong = [a for a in storm.long_answers if a[1] != 200 or not a[2].startswith(expected[a[0]])]
        assert not wrong, f"{len(wrong)} long answers failed or came from another adapter: {wrong[:3]}"
        assert storm.churn_cycles >= 2
        assert len(storm.answers) > 2 * CLIENTS

        listed, info = settled_view(url, vllm_url)  # the next probes make the gateway's view vLLM's list
        assert info["in_flight"] == {}
        assert all(c["acquired"] == c["released"] for c in info["leases"].values()), info["leases"]
        report = []
        for name in ADAPTERS:
            loads, evictions = metric(url, LOADS, adapter=name), metric(url, EVICTIONS, adapter=name)
            resident = mine[name] in listed
            report.append(f"{name}: {loads:.0f} loads, {evictions:.0f} evictions, resident={resident}")
            assert loads == evictions + resident, f"a load without a cold miss: {report}"
            assert mine[name] in info["last_load_at"]
        assert metric(url, LOADS, result="error") == 0
        assert not storm.violations, f"{len(storm.violations)} of {storm.samples}: {storm.violations[:5]}"
        proved = storm.held_throughout
        assert proved >= PROOFS, (
            f"in {storm.samples} looks, only {proved} saw an adapter in flight throughout"
        )
        looks = (
            f"{storm.samples} looks saw an adapter in flight throughout {proved} times, each listed by vLLM"
        )
        print(
            f"\n{len(storm.answers)} requests, {storm.churn_cycles} churn cycles, {looks}; "
            + "; ".join(report)
        )
    assert_stopped(url)


def test_all_slots_leased_by_streams_gives_503_with_retry_after(
    vllm_url: str, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "src"
    for i, name in enumerate(["x", "y", "z"]):
        write_adapter(tiny_cache["base"], root / name, seed=2000 + i)
    registry = {"max_resident": 4, "load_wait_timeout_s": 0.5, "drain_after_s": 0.1}
    settings = registry_settings(vllm_url, cache_dir, tmp_path, root, registry=registry, retry_after_s=3)
    with serve_app(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        names = register_xyz(url, tiny_cache, root)
        body = held_stream(tiny_cache)
        with (
            http.stream("POST", "/v1/completions", json={**body, "model": "x"}) as sx,
            http.stream("POST", "/v1/completions", json={**body, "model": "y"}) as sy,
        ):
            assert sx.status_code == sy.status_code == 200
            waited = time.monotonic()
            r = complete(url, "z")
            waited = time.monotonic() - waited
            info = engine(url)
            assert info["in_flight"] == {names["x"]: 1, names["y"]: 1}
            assert {"x@1", "y@1", "demo-a@1", "demo-b@1"} == set(info["resident_models"])
            assert {names["x"], names["y"]} <= info["last_load_at"].keys()
            assert_openai_error(r, 503, "adapter_slots_busy")
            assert r.headers["retry-after"] == "3"
            assert waited >= 0.5, waited
            # z drained x or y while it waited; it gave up, so both take requests again at once
            assert engine(url)["draining"] == []
            assert metric(url, "lora_gateway_adapter_drains_total") == 1
            assert complete(url, "x").status_code == complete(url, "y").status_code == 200
        # The streams are gone (client disconnect): their leases are released, z can load.
        deadline = time.monotonic() + 30
        while (r := complete(url, "z")).status_code != 200:
            assert r.status_code == 503 and time.monotonic() < deadline, r.text
            time.sleep(0.2)
        # An aborted stream's lease is held until vLLM's metrics stop showing its adapter (at most
        # ABORT_SETTLE_S, gateway/residency/leases.py): z loading means one was let go, not both yet.
        while (info := engine(url))["in_flight"]:
            assert time.monotonic() < deadline, f"a lease was never released: {info['in_flight']}"
            time.sleep(0.1)
        assert "z@1" in info["resident_models"]
    assert_stopped(url)


def register_xyz(url: str, tiny_cache: dict[str, Path], root: Path) -> dict[str, str]:
    """demo-a and demo-b pinned, then x, y, z from `root`; their engine names by registered name.

    The session's gateway shares this vLLM and reloads its demo adapters whenever they are evicted;
    pinned here too (same bytes, same engine names), they hold two slots that nobody fights over (and
    that are never drained)."""
    for demo in ("demo-a", "demo-b"):
        register(url, demo, tiny_cache[demo], pin=True)
    for name in ("x", "y", "z"):
        register(url, name, root / name)
    return engine_names(url)


def test_a_cold_adapter_drains_the_least_busy_one_and_loads_when_it_is_idle(
    vllm_url: str, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "src"
    for i, name in enumerate(["x", "y", "z"]):
        write_adapter(tiny_cache["base"], root / name, seed=2100 + i)
    registry = {"max_resident": 4, "load_wait_timeout_s": 60}
    settings = registry_settings(vllm_url, cache_dir, tmp_path, root, registry=registry)
    with (
        serve_app(settings) as url,
        httpx.Client(base_url=url, timeout=60) as http,
        ThreadPoolExecutor(2) as pool,
    ):
        names = register_xyz(url, tiny_cache, root)
        body = held_stream(tiny_cache)
        with (
            http.stream("POST", "/v1/completions", json={**body, "model": "x"}) as sx1,
            http.stream("POST", "/v1/completions", json={**body, "model": "x"}) as sx2,
            http.stream("POST", "/v1/completions", json={**body, "model": "y"}) as sy,
        ):
            assert sx1.status_code == sx2.status_code == sy.status_code == 200
            want_z = pool.submit(complete, url, "z")
            deadline = time.monotonic() + 30
            while engine(url)["draining"] != [names["y"]]:  # y: one request in flight, x two
                assert time.monotonic() < deadline and not want_z.done(), engine(url)
                time.sleep(0.05)
            want_y = pool.submit(complete, url, "y")
            assert complete(url, "x").status_code == 200, "x is not draining: it takes requests"
            assert not want_y.done() and not want_z.done(), "y takes no new request while it drains"
            sy.close()  # y's last request ends: y goes, z loads in its slot
            assert want_z.result(timeout=60).status_code == 200
            assert want_y.result(timeout=60).status_code == 200, "then y loads again, when z is idle"
            info = engine(url)
            assert info["in_flight"] == {names["x"]: 2} and info["draining"] == []
            assert {"x@1", "y@1", "demo-a@1", "demo-b@1"} == set(info["resident_models"])
        assert metric(url, "lora_gateway_adapter_drains_total", adapter="y") == 1
        assert metric(url, "lora_gateway_adapter_evictions_total", adapter="y") == 1
        assert metric(url, "lora_gateway_adapter_loads_total", adapter="y", result="ok") == 2
    assert_stopped(url)


def test_more_adapters_registered_than_vllm_keeps_in_memory(
    vllm_url: str, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path
) -> None:
    names = [f"m{i}" for i in range(7)]  # the session's vLLM: --max-cpu-loras 4, --max-loras 2
    root = tmp_path / "src"
    for i, name in enumerate(names):
        write_adapter(tiny_cache["base"], root / name, seed=2200 + i)
    settings = registry_settings(vllm_url, cache_dir, tmp_path, root)
    assert settings.max_resident() > 2 * settings.engine.max_cpu_loras
    with serve_app(settings) as url:
        for name in names:
            register(url, name, root / name)
        # Each answer alone, with its logprobs: under batching vLLM's bf16 arithmetic on this CPU can flip a
        # near tie (seen: 'j' at -4.855 against ' by' at -4.902 nats), which is not another adapter's answer.
        refs, key = References(), request_key(greedy(names[0]))
        learn(url, "/v1/completions", [(name, greedy(name)) for name in names], refs)
        expected = {name: refs.text(name, key) for name in names}
        assert len(set(expected.values())) == len(names), f"adapters must be told apart: {expected}"
        # reversed: the first ones have left vLLM's memory since; vLLM reads them back from disk
        assert {name: text(url, name, max_tokens=MAX_TOKENS) for name in reversed(names)} == expected

        async def clients() -> list[tuple[str, int, str]]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:

                async def one(name: str) -> tuple[str, int, str]:
                    r = await http.post("/v1/completions", json=greedy(name))
                    return name, r.status_code, r.json()["choices"][0]["text"] if r.is_success else r.text

                order = names * 6
                random.Random(0).shuffle(order)  # 42 at once: 7 adapters through 2 batch slots
                return await asyncio.gather(*(one(name) for name in order))

        answers = asyncio.run(clients())
        failed = [a for a in answers if a[1] != 200]
        assert not failed, f"{len(failed)} of {len(answers)} failed: {failed[:5]}"
        verdicts = [(name, answer, refs.check(name, key, answer)) for name, _, answer in answers]
        wrong = [(n, a, v.as_model) for n, a, v in verdicts if not v.ok and not v.near_tie]
        assert not wrong, f"{len(wrong)} of {len(answers)} answers not their adapter's own: {wrong[:5]}"
        mine = engine_names(url)
        assert {mine[n] for n in names} <= vllm_adapters(vllm_url)
        for name in names:  # the gateway loaded each once and never unloaded one
            assert metric(url, LOADS, adapter=name) == 1
            assert metric(url, EVICTIONS, adapter=name) == 0
    assert_stopped(url)
