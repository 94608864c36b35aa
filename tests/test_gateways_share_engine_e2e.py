"""Two gateways over one vLLM (one PostgreSQL registry, one adapter store), with more adapters than the
engine keeps loaded, clients on both at once: no failed request, no wrong answer, no adapter unloaded
while either gateway has a request in flight for it, and no more loads in the same time than the same
clients through one gateway, plus a stated margin (gateway/residency/shared.py).

The same run with `registry.share_use: false` (each gateway deciding alone, as before) failed here on
2026-12-02 (docs/deploy.md, "Several gateways"): a request lost to a 404 twice, 2.5x the loads per answer,
and in another run vLLM's engine crashed.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from loadtest.harness.verify import References, request_key
from tests.conftest import ENGINE_AUTH, serve_app
from tests.pg import new_database
from tests.registry_helpers import PROMPT, learn, metric, register, registry_settings, write_adapter

pytestmark = pytest.mark.engine

ADAPTERS = [f"s{i}" for i in range(4)]  # over 2 slots
CLIENTS = 8  # in all: through one gateway, or half through each
RUN_S = 20.0
MAX_TOKENS = 6
LONG_TOKENS = 300
# Two gateways may both load a cold adapter at the same moment (each made room for it): such races, and
# requests admitted by one gateway in the few ms before it published them, cost extra loads.
LOAD_MARGIN = 1.25
LOAD_SLACK = 4
PER_ANSWER_MARGIN = 1.8
LOADS = "lora_gateway_adapter_loads_total"
HELD_S = 0.15  # vs registry.share_use_interval_s, 25 ms


def greedy(model: str) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


@dataclass
class Run:
    answers: list[tuple[str, int, str]] = field(default_factory=list)
    long_answers: list[tuple[str, int, str]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    proofs: int = 0  # looks that proved an adapter had a request in flight throughout
    lost_retries: float = 0.0  # requests whose adapter another gateway unloaded (retried): the race left


async def client_loop(http: httpx.AsyncClient, url: str, seed: int, deadline: float, run: Run) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        model = rng.choice(ADAPTERS)
        r = await http.post(url + "/v1/completions", json=greedy(model))
        run.answers.append((model, r.status_code, r.json()["choices"][0]["text"] if r.is_success else r.text))
        await asyncio.sleep(rng.uniform(0, 0.05))


async def long_client_loop(http: httpx.AsyncClient, url: str, seed: int, deadline: float, run: Run) -> None:
    """Requests that hold their adapter for seconds: what the watch proves held (its answer's start is the
    short one's, and is judged with it)."""
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        model = rng.choice(ADAPTERS)
        r = await http.post(url + "/v1/completions", json=greedy(model) | {"max_tokens": LONG_TOKENS})
        text = r.json()["choices"][0]["text"] if r.is_success else r.text
        run.long_answers.append((model, r.status_code, text))


async def adapter_lost_retries(http: httpx.AsyncClient, url: str) -> float:
    """`lora_gateway_retries_total{reason="adapter_lost"}`: requests vLLM answered 404 (adapter gone),
    loaded again and retried."""
    text = (await http.get(url + "/metrics")).text
    found = re.search(r'^lora_gateway_retries_total\{reason="adapter_lost"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def watch(http: httpx.AsyncClient, url: str, vllm_url: str, deadline: float, run: Run) -> None:
    """A gateway's view, vLLM's listing `HELD_S` later, the view again: an adapter with `c` requests in
    flight at the first look and fewer than `c` leases released by the second had one in flight throughout,
    for `HELD_S` at least before the listing: far longer than a gateway takes to publish it, so no other
    gateway may have unloaded it: vLLM must list it. (A request younger than the publishing can lose its
    adapter to another gateway's eviction: vLLM answers 404, the gateway loads it again and retries it,
    still holding its lease; a look during which that happened proves nothing and is skipped. The answers
    show those requests right.)"""
    while time.monotonic() < deadline:
        lost_before = await adapter_lost_retries(http, url)
        [first] = (await http.get(url + "/admin/engines")).json()["data"]
        await asyncio.sleep(HELD_S)
        models = (await http.get(vllm_url + "/v1/models", headers=ENGINE_AUTH)).json()["data"]
        listed = {m["id"] for m in models if m.get("parent")}
        [second] = (await http.get(url + "/admin/engines")).json()["data"]
        if await adapter_lost_retries(http, url) != lost_before:
            continue  # a request met the race the sharing leaves (see above): it is retried, not a proof
        for key, count in first["in_flight"].items():
            released = second["leases"][key]["released"] - first["leases"][key]["released"]
            if released < count:
                run.proofs += 1
                if key not in listed:
                    run.violations.append(f"{key} was in flight on {url} throughout, vLLM dropped it")
        await asyncio.sleep(0.05)


def drive(urls: list[str], vllm_url: str) -> Run:
    run = Run()

    async def main() -> None:
        deadline = time.monotonic() + RUN_S
        limits = httpx.Limits(max_connections=CLIENTS + 8)
        async with httpx.AsyncClient(limits=limits, timeout=120) as http:
            await asyncio.gather(
                *(client_loop(http, urls[i % len(urls)], i, deadline, run) for i in range(CLIENTS)),
                *(long_client_loop(http, url, -i - 1, deadline, run) for i, url in enumerate(set(urls))),
                *(watch(http, url, vllm_url, deadline, run) for url in set(urls)),
            )

    asyncio.run(main())
    run.lost_retries = sum(
        metric(url, "lora_gateway_retries_total", reason="adapter_lost") for url in set(urls)
    )
    return run


def judge(run: Run, refs: References) -> tuple[list, list]:
    key = request_key(greedy(ADAPTERS[0]))
    cut = [(model, status, text[: len(refs.text(model, key))]) for model, status, text in run.long_answers]
    answers = run.answers + cut
    failed = [a for a in answers if a[1] != 200]
    wrong = [a for a in answers if a[1] == 200 and not refs.check(a[0], key, a[2]).ok]
    return failed, wrong


def test_two_gateways_over_one_vllm_do_not_undo_each_others_loads(
    postgres_url: str, vllm_url: str, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path
) -> None:
    database = new_database(postgres_url)
    root = tmp_path / "src"
    for i, name in enumerate(ADAPTERS):
        write_adapter(tiny_cache["base"], root / name, seed=7100 + i)

    def settings(name: str):  # noqa: ANN202
        registry = {
            "url": database,
            "store_dir": str(tmp_path / "store"),  # the volume both gateways (and vLLM) read
            "max_resident": 2,
            "load_wait_timeout_s": 60,
            "poll_interval_s": 0.3,
        }
        return registry_settings(vllm_url, cache_dir, tmp_path / name, root, registry=registry)

    refs = References()
    with serve_app(settings("a")) as a:
        for name in ADAPTERS:
            register(a, name, root / name)
        learn(a, "/v1/completions", [(name, greedy(name)) for name in ADAPTERS], refs)
        key = request_key(greedy(ADAPTERS[0]))
        assert len({refs.text(m, key) for m in ADAPTERS}) == len(ADAPTERS), "the adapters must differ"
        before = metric(a, LOADS)
        alone = drive([a], vllm_url)
        loads_alone = metric(a, LOADS) - before

    with serve_app(settings("a")) as a, serve_app(settings("b")) as b:
        before = metric(a, LOADS) + metric(b, LOADS)
        shared = drive([a, b], vllm_url)
        loads_shared = metric(a, LOADS) + metric(b, LOADS) - before

    print(
        f"\none gateway: {len(alone.answers)} answers, {loads_alone:.0f} loads; "
        f"two: {len(shared.answers)} answers, {loads_shared:.0f} loads, {shared.lost_retries:.0f} retried, "
        f"{shared.proofs} proofs"
    )
    for run in (alone, shared):
        failed, wrong = judge(run, refs)
        assert not failed, f"{len(failed)} of {len(run.answers)} failed: {failed[:3]}"
        assert not wrong, f"{len(wrong)} of {len(run.answers)} wrong: {wrong[:3]}"
        assert not run.violations, run.violations[:5]
    assert shared.proofs >= 1, "the watch must have proved a request in flight with two gateways"
    # Not bounded: retries because vLLM no longer had the adapter (5-10% of the answers here). Most come
    # from a gateway's view being older than another's eviction (it learns at its next probe), none is a
    # wrong answer or a failure (checked above).
    # "Loaded no more often": loads in the same RUN_S, within the margin. And not by serving less: waiting
    # for the other gateway's requests costs answers (0.7-0.9x of one gateway's here), so per answer the
    # margin is wider (measured 1.13-1.46x; deciding alone: 2.5x).
    assert loads_shared <= loads_alone * LOAD_MARGIN + LOAD_SLACK, (
        f"two gateways loaded {loads_shared:.0f} times, one {loads_alone:.0f}, in {RUN_S:.0f} s each"
    )
    per_answer = (loads_shared / len(shared.answers)) / (loads_alone / len(alone.answers))
    assert per_answer <= PER_ANSWER_MARGIN, f"{per_answer:.2f}x the loads per answer of one gateway"
