"""The managed vLLM dies: the gateway notices, answers 503/502 meanwhile, restarts it, restores adapters.

The kill comes under the chaos workload of `lora-gateway loadtest chaos` (docs/reliability.md), CI-sized:
24 clients in a process of their own, base model and both adapters, streamed and not, across the kill,
the restart and a few seconds of service after it. No wrong answer, every failure in OpenAI's shape, every
stream ending with `[DONE]` or one error event, every 503 with `Retry-After`, served again after the
restart, and the gateway's resident set equal to vLLM's listing (drift 0).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from loadtest.chaos.clients import PATH, background_clients, chaos_plan, summarize, violations
from loadtest.harness.verify import References
from tests.conftest import ENGINE_AUTH, GatewayProcess
from tests.registry_helpers import HTTP, learn

pytestmark = pytest.mark.engine


def vllm_processes(gateway: GatewayProcess) -> list[psutil.Process]:
    children = psutil.Process(gateway.proc.pid).children(recursive=False)
    return [p for p in children if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())]


def listed(gateway: GatewayProcess) -> set[str]:
    data = HTTP.get(gateway.vllm_url + "/v1/models", headers=ENGINE_AUTH, timeout=10).json()["data"]
    return {m["id"] for m in data if m.get("parent")}


def resident(gateway: GatewayProcess, timeout: float = 10) -> set[str]:
    """What the gateway reports resident, once it equals what vLLM itself lists (the next probe after a
    change replaces the gateway's view with vLLM's list; a listing read before and after the gateway's
    view, and equal, is the state the view must show)."""
    deadline = time.monotonic() + timeout
    while True:
        before = listed(gateway)
        [engine] = HTTP.get(gateway.url + "/admin/engines").json()["data"]
        if before == listed(gateway) == set(engine["resident_adapters"]):
            return set(engine["resident_models"])
        assert time.monotonic() < deadline, (
            f"the gateway reports {sorted(engine['resident_adapters'])} resident, vLLM lists {sorted(before)}"
        )
        time.sleep(0.1)


def test_killed_vllm_is_restarted_with_adapters_restored(
    gateway: GatewayProcess, tiny_cache: dict[str, Path]
) -> None:
    resident(gateway)  # equal before, as after
    [vllm] = vllm_processes(gateway)
    assert "--enable-lora" in vllm.cmdline() and "127.0.0.1" in vllm.cmdline()
    plan, refs = chaos_plan(["tiny-llama", "demo-a", "demo-b"]), References()
    learn(gateway.url, PATH, plan, refs)
    with background_clients(gateway.url, plan, refs, clients=24) as clients:
        kill_at = _kill_and_restart(gateway, vllm, tiny_cache) - clients.t0
        time.sleep(5)  # the clients are served by the new vLLM for a while
    s = summarize(clients.outcomes, kill_at=kill_at)
    print(f"\nchaos, one replica killed: { {k: v for k, v in s.items() if k != 'examples'} }")
    assert not violations(s), violations(s)
    assert s["requests_sent"] >= 48 and s["streamed"] and s["streamed"] < s["requests_sent"]
    assert s["seconds_until_served_again"] is not None, "no client was served after the restart"
    resident(gateway)  # drift 0 once the clients have stopped


def _kill_and_restart(gateway: GatewayProcess, vllm: psutil.Process, tiny_cache: dict[str, Path]) -> float:
    """Kill vLLM under a stream, check what clients get meanwhile and after its restart; the kill's time."""
    # A stream in flight when vLLM dies ends with one error event in OpenAI's shape (its status line went
    # out already), not a silent cut: the README promises `data: {"error": ...}`. The kill comes as soon as
    # the status line is in, and the stream asks for far more than the tiny model can generate meanwhile
    # (16 sequences of nearly the whole context), however late a loaded machine delivers the events.
    context = json.loads((tiny_cache["base"] / "config.json").read_text())["max_position_embeddings"]
    stream_body = {
        "model": "demo-a",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": context - 64,
        "n": 16,
        "temperature": 1.0,
        "ignore_eos": True,
        "stream": True,
        # ~1 KB an event, far more than the sockets between vLLM and this unread client hold: vLLM's engine
        # may finish generating before the kill (its frontend lags under the chaos clients), but the
        # stream cannot have been delivered whole before the client reads.
        "logprobs": True,
        "top_logprobs": 20,
    }
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=stream_body, timeout=60) as r:
        assert r.status_code == 200
        killed = time.monotonic()
        os.killpg(vllm.pid, signal.SIGKILL)
        rest = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert rest, "the stream ended without a word"
    assert rest[-1] != "data: [DONE]", f"the stream ended by itself before the kill: {len(rest)} events"
    last = json.loads(rest[-1].removeprefix("data: "))
    assert set(last) == {"error"} and set(last["error"]) == {"message", "type", "param", "code"}, rest[-1]
    assert last["error"]["code"] == "upstream_error" and "[DONE]" not in rest[-1]

    # While it is down: clear errors, never a hang or an HTML page.
    # `/admin/engines` never shows the engine ready without a process (pid null: it has exited).
    deadline = time.monotonic() + 30
    while HTTP.get(gateway.url + "/health").status_code == 200:
        [info] = HTTP.get(gateway.url + "/admin/engines").json()["data"]
        assert info["pid"] is not None or info["state"] != "ready", info
        assert time.monotonic() < deadline, "gateway never noticed that vLLM died"
        time.sleep(0.05)
    body = {"model": "demo-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(gateway.url + "/v1/chat/completions", json=body)
    assert r.status_code in (502, 503)
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    if r.status_code == 503:
        assert int(r.headers["retry-after"]) > 0

    gateway.wait_healthy()
    [new] = vllm_processes(gateway)
    assert new.pid != vllm.pid
    deadline = time.monotonic() + 10
    while not {"demo-a@1", "demo-b@1"} <= resident(gateway):
        assert time.monotonic() < deadline, "adapters are loaded again after a restart"
        time.sleep(0.1)
    r = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "demo-a"
    return killed
