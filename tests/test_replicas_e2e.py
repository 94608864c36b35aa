"""Several real vLLM replicas behind one gateway: affinity, fewer loads than round-robin, failover.

One gateway manages two vLLM CPU processes (`engine.replicas: 2`) for the whole module; a second,
attached gateway over the same two replicas routes round-robin, for the comparison.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from adapters.demo import RandomAdapterSpec, write_random_adapter
from gateway.settings import Settings
from loadtest.chaos.clients import PATH, background_clients, chaos_plan, summarize, violations
from loadtest.harness.verify import References, request_key
from tests.conftest import free_port, serve_app
from tests.registry_helpers import HTTP, learn, metric

pytestmark = pytest.mark.engine
KEY = "replicas-test-key"


def write_adapters(folder: Path, base: Path, prefix: str, seeds: range) -> list[str]:
    names = []
    for seed in seeds:
        name = f"{prefix}{seed}"
        write_random_adapter(base, folder / name, RandomAdapterSpec(name, seed=1000 + seed), "tiny-llama")
        names.append(name)
    return names


@pytest.fixture(scope="module")
def replicas(
    tiny_cache: dict[str, Path], cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("replicas")
    affinity_names = write_adapters(root / "affinity", tiny_cache["base"], "aff", range(4))
    rr_names = write_adapters(root / "rr", tiny_cache["base"], "rr", range(4))
    port = free_port()
    managed = Settings(
        cache_dir=cache_dir,
        data_dir=root / "data-a",
        adapters_dir=root / "affinity",
        engine={"replicas": 2, "port": port, "max_cpu_loras": 2, "health_interval_s": 0.5, "api_key": KEY},
        registry={"max_resident": 2},
    )
    with serve_app(managed, ready_timeout=420) as url:
        urls = [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
        deadline = time.monotonic() + 420
        while not all(e["state"] == "ready" for e in engines(url)):  # both replicas up, not just one
            assert time.monotonic() < deadline, engines(url)
            time.sleep(0.5)
        yield {"url": url, "vllm": urls, "root": root, "affinity": affinity_names, "rr": rr_names}


def chat(url: str, model: str) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "temperature": 0,
    }
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def loads(url: str) -> float:
    text = HTTP.get(url + "/metrics").text
    return sum(
        float(x.split()[-1])
        for x in text.splitlines()
        if x.startswith("lora_gateway_adapter_loads_total{") and 'result="ok"' in x
    )


def engines(url: str) -> list[dict]:
    return HTTP.get(url + "/admin/engines").json()["data"]  # polled: one client (tests/registry_helpers.py)


def test_affinity_keeps_an_adapter_on_its_replica(replicas: dict) -> None:
    url = replicas["url"]
    for _ in range(4):
        assert chat(url, "aff0").status_code == 200
    holders = [e["name"] for e in engines(url) if any(m.startswith("aff0@") for m in e["resident_models"])]
    assert len(holders) == 1, f"aff0 should live on one replica, found on {holders}"


def test_affinity_loads_a_third_of_round_robin_or_less(replicas: dict, cache_dir: Path) -> None:
    rng = random.Random(1)
    sequence = [rng.randrange(4) for _ in range(60)]
    url = replicas["url"]
    before = loads(url)
    for i in sequence:
        assert chat(url, replicas["affinity"][i]).status_code == 200
    affinity_loads = loads(url) - before

    rr = Settings(
        cache_dir=cache_dir,
        data_dir=replicas["root"] / "data-rr",
        adapters_dir=replicas["root"] / "rr",
        engine={
            "mode": "attached",
            "urls": replicas["vllm"],
            "max_cpu_loras": 2,
            "health_interval_s": 0.5,
            "api_key": KEY,  # the managed replicas' key: they answer 401 on /v1 without it
        },
        registry={"max_resident": 2},
        routing="round_robin",
    )
    with serve_app(rr) as rr_url:
        before = loads(rr_url)
        for i in sequence:
            assert chat(rr_url, replicas["rr"][i]).status_code == 200
        rr_loads = loads(rr_url) - before
    assert affinity_loads * 3 <= rr_loads, f"affinity {affinity_loads} loads vs round-robin {rr_loads}"


MIXED = ("tiny-llama", "aff1", "aff2")
LONG_N, LONG_TOKENS = 8, 900


def greedy_chat(model: str, max_tokens: int = 8) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}  # fmt: skip


def test_killing_a_replica_fails_no_request(replicas: dict) -> None:
    """A replica dies with a request in flight on it (the gateway counts its lease there when the replica
    is killed): that request is sent again to the survivor (`lora_gateway_retries_total{reason=
    "engine_failed"}`) and answered in full. Meanwhile the chaos workload (docs/reliability.md, CI-sized:
    24 clients in a process of their own, the base model and two adapters, streamed and not) keeps going:
    no request that had not started is lost, no answer is another model's (checked against each model's
    answer alone, near ties aside), and the only failures are streams already running on the victim, each
    ending with one error event in OpenAI's shape."""
    url = replicas["url"]
    plan, refs = chaos_plan(MIXED), References()
    learn(url, PATH, plan, refs)
    key = request_key(greedy_chat("tiny-llama"))  # "hi", 8 tokens: the plan's first prompt
    assert len({refs.text(m, key) for m in MIXED}) == len(MIXED), "the models must answer differently"
    # A long answer for aff3 (resident on one replica); the replica running it dies while it generates.
    assert chat(url, "aff3").status_code == 200
    [aff3] = [v["engine_name"] for v in httpx.get(url + "/admin/adapters/aff3").json()["versions"]]
    retries = metric(url, "lora_gateway_retries_total", reason="engine_failed")

    # Far more than a loaded box generates before the kill: 8 sampled sequences of 900 tokens.
    long = greedy_chat("aff3", max_tokens=LONG_TOKENS) | {"n": LONG_N, "temperature": 1.0, "seed": 5}
    # The long request first: once it holds aff3's lease on the victim, the other clients' loads cannot
    # evict aff3 there (they start after it, so none of them sends it elsewhere first).
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, url + "/v1/chat/completions", json=long, timeout=300)
        deadline = time.monotonic() + 60
        # The victim is the replica running it (where aff3 is resident, unless routing spread it).
        while not (running := [e for e in engines(url) if e["in_flight"].get(aff3) == 1]):
            assert time.monotonic() < deadline and not in_flight.done(), (
                f"aff3 was never seen in flight: {in_flight.result().text[:300] if in_flight.done() else ''}"
            )
            time.sleep(0.005)
        [victim] = running
        with background_clients(url, plan, refs, clients=24) as clients:  # returns once one has ended
            kill_at = clients.now()
            os.killpg(psutil.Process(victim["pid"]).pid, signal.SIGKILL)
            r = in_flight.result(timeout=300)
            time.sleep(5)  # requests keep flowing on the survivor while the victim is down
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "aff3" and r.json()["usage"]["completion_tokens"] == LONG_N * LONG_TOKENS
    assert metric(url, "lora_gateway_retries_total", reason="engine_failed") >= retries + 1
    s = summarize(clients.outcomes, kill_at=kill_at)
    print(f"\nchaos, one of two replicas killed: { {k: v for k, v in s.items() if k != 'examples'} }")
    assert not violations(s, unstarted_lost=0), violations(s, unstarted_lost=0)
    assert s["failed"] == s["streams_one_error"], s["failures_by_kind"]  # only streams cut on the victim
    assert s["right"] > 20 and s["streamed"] and s["seconds_until_served_again"] is not None, s
