"""The gateway end to end over real HTTP, with an in-memory vLLM behind it (tests/fake_engine.py): auth,
routes, the model name put back, metrics, leases, retries and failover, mid-stream errors, in
milliseconds each. The same behaviours run against the real vLLM in the *_e2e.py files; these give a
developer most of the signal without starting one.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.settings import Settings
from tests.conftest import serve_app
from tests.fake_engine import FakeEngineClient, FakeVllm, answer_words
from tests.registry_helpers import metric

A, B = "http://engine-a.invalid:8000", "http://engine-b.invalid:8000"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


class Gateway:
    def __init__(self, url: str, client: FakeEngineClient, base: str) -> None:
        self.url = url
        self.client = client
        self.base_name = base  # the served name: what clients and vLLM both call the base model

    def chat(self, model: str, key: str | None = None, **body: object) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        payload = {"model": model, "messages": MESSAGES, **body}
        return httpx.post(self.url + CHAT, json=payload, headers=headers, timeout=10)

    def engines(self) -> list[dict]:
        return httpx.get(self.url + "/admin/engines").json()["data"]

    def settled(self) -> None:
        """Nothing in flight, and every lease acquired was released."""
        for info in self.engines():
            assert info["in_flight"] == {}, info
            assert all(c["acquired"] == c["released"] for c in info["leases"].values()), info["leases"]
            assert info["active_requests"] == 0, info


MakeGateway = Callable[..., Gateway]


@pytest.fixture
def make_gateway(tiny_cache: dict[str, Path], cache_dir: Path, tmp_path: Path) -> Iterator[MakeGateway]:
    """Gateways over fake engines at `urls`, stopped when the test ends."""
    with contextlib.ExitStack() as stack:

        def make(urls: tuple[str, ...] = (A,), engine: dict | None = None, **overrides: Any) -> Gateway:
            engine = {"mode": "attached", "urls": list(urls), "health_interval_s": 0.05, **(engine or {})}
            settings = Settings(cache_dir=cache_dir, data_dir=tmp_path / "data", engine=engine, **overrides)
            base = settings.base_model_name()
            client = FakeEngineClient({u: FakeVllm(base) for u in urls})
            return Gateway(stack.enter_context(serve_app(settings, engine_client=client)), client, base)

        yield make


def test_base_and_adapter_answers_carry_the_name_the_client_used(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0) as sdk:
        base = sdk.chat.completions.create(model=gw.base_name, messages=MESSAGES)
        adapter = sdk.chat.completions.create(model="demo-a", messages=MESSAGES)
        chunks = list(sdk.completions.create(model="demo-a", prompt="hi", stream=True))
    assert base.model == gw.base_name
    assert base.choices[0].message.content == " ".join(answer_words(gw.base_name))
    assert adapter.model == "demo-a"
    engine_name = gw.client.engines[A].requests[1]["model"]
    assert engine_name != "demo-a" and adapter.choices[0].message.content == " ".join(
        answer_words(engine_name)
    )
    assert {c.model for c in chunks} == {"demo-a"}, "every event says demo-a, not vLLM's name for it"
    assert all(c.usage is None for c in chunks), "the usage event the gateway asked for is not passed on"
    assert metric(gw.url, "lora_gateway_requests_total", model="demo-a", status="200") == 2
    assert metric(gw.url, "lora_gateway_completion_tokens_total", model="demo-a") == 6
    gw.settled()


def test_api_keys_scope_models(make_gateway: MakeGateway) -> None:
    keys = [{"key": "team-a", "models": ["demo-a"]}, {"key": "all", "models": ["*"]}]
    gw = make_gateway(auth={"api_keys": keys})
    assert gw.chat("demo-a").status_code == 401
    assert gw.chat("demo-a", key="wrong").status_code == 401
    r = gw.chat("demo-b", key="team-a")
    assert r.status_code == 403 and r.json()["error"]["param"] == "model"
    assert gw.chat("demo-a", key="team-a").status_code == 200
    assert gw.chat("demo-b", key="all").status_code == 200
    listed = httpx.get(gw.url + "/v1/models", headers={"authorization": "Bearer team-a"}).json()["data"]
    assert {m["id"] for m in listed} == {"demo-a", "demo-a@1"}
    assert metric(gw.url, "lora_gateway_requests_total", status="401") == 2
    gw.settled()


def test_a_refusing_replica_is_skipped_and_the_request_retried_once(make_gateway: MakeGateway) -> None:
    gw = make_gateway((A, B), engine={"health_interval_s": 300})  # ready, then no probe sees A go
    gw.client.engines[A].refuse = True
    statuses = [gw.chat(gw.base_name).status_code for _ in range(4)]
    assert statuses == [200] * 4
    assert metric(gw.url, "lora_gateway_retries_total", reason="engine_failed") == 1  # then A cools down
    assert len(gw.client.engines[B].requests) == 4 and not gw.client.engines[A].requests
    cooling = {e["name"]: e["cooling_down"] for e in gw.engines()}
    assert list(cooling.values()).count(True) == 1
    gw.settled()


def test_no_other_replica_means_502_after_one_try(make_gateway: MakeGateway) -> None:
    gw = make_gateway(engine={"health_interval_s": 300})
    gw.client.engines[A].refuse = True
    r = gw.chat(gw.base_name)
    assert r.status_code == 502 and r.json()["error"]["code"] == "engine_unreachable"
    assert metric(gw.url, "lora_gateway_retries_total") == 0
    gw.settled()


def test_an_adapter_vllm_lost_is_loaded_again_and_the_request_retried(make_gateway: MakeGateway) -> None:
    # no probe notices the loss first; vLLM keeps both demo adapters (both preloaded: demo-b's leases stay 0)
    gw = make_gateway(engine={"health_interval_s": 300, "max_cpu_loras": 4})
    assert gw.chat("demo-a").status_code == 200
    [before] = [e["leases"] for e in gw.engines()]
    [limits] = [e["lora_limits"] for e in gw.engines()]  # attached: what it was told, else vLLM's defaults
    assert (limits["max_loras"], limits["max_cpu_loras"], limits["max_resident"]) == (1, 4, 64)
    gw.client.engines[A].adapters.clear()  # vLLM restarted, or someone unloaded it
    r = gw.chat("demo-a")
    assert r.status_code == 200 and r.json()["model"] == "demo-a"
    assert metric(gw.url, "lora_gateway_retries_total", reason="adapter_lost") == 1
    [after] = [e["leases"] for e in gw.engines()]
    taken = {k: c["acquired"] - before[k]["acquired"] for k, c in after.items()}
    assert sorted(taken.values()) == [0, 2], f"one lease per attempt, on demo-a only: {taken}"
    gw.settled()


def test_a_stream_broken_after_its_first_events_ends_with_one_error_event(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    gw.client.engines[A].drop_after_events = 2
    body = {"model": "demo-b", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", gw.url + CHAT, json=body, timeout=10) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) == 3 and '"error"' in events[-1] and "[DONE]" not in events[-1]
    assert all(response.closed for response in gw.client.responses), "the upstream response is closed"
    assert metric(gw.url, "lora_gateway_request_errors_total", model="demo-b", code="upstream_error") == 1
    gw.settled()


def test_a_non_streaming_client_that_leaves_drops_the_engine_call(make_gateway: MakeGateway) -> None:
    """Nothing is sent to a non-streaming client before the engine has answered; if it leaves meanwhile, the
    gateway drops the engine call (vLLM aborts; measured against the real one in
    tests/test_streaming_disconnect.py), records 499 and lets go of the lease."""
    gw = make_gateway()
    vllm = gw.client.engines[A]
    vllm.hang = True
    host, port = gw.url.removeprefix("http://").split(":")
    data = json.dumps({"model": "demo-a", "prompt": "hi", "max_tokens": 5}).encode()
    with socket.create_connection((host, int(port))) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        sock.sendall(head.encode() + f"content-length: {len(data)}\r\n\r\n".encode() + data)
        deadline = time.monotonic() + 10
        while not vllm.requests:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    while metric(gw.url, "lora_gateway_requests_total", model="demo-a", status="499") != 1:
        assert time.monotonic() < deadline, "the request was never recorded as the client's departure"
        time.sleep(0.01)
    assert vllm.dropped == 1
    gw.settled()


def test_a_replica_that_dies_while_its_adapter_loads_hands_the_request_to_another(
    make_gateway: MakeGateway,
) -> None:
    """The adapter's load on the chosen replica finds it refusing (it died since its last probe): the
    request has sent nothing yet, so another replica takes it, as for a refused request."""
    gw = make_gateway((A, B), engine={"health_interval_s": 300}, routing="round_robin")  # A is picked first
    gw.client.engines[A].refuse = True
    r = gw.chat("demo-a")
    assert r.status_code == 200 and r.json()["model"] == "demo-a"
    assert metric(gw.url, "lora_gateway_retries_total", reason="engine_failed") == 1
    assert gw.client.engines[B].requests and not gw.client.engines[A].requests
    gw.settled()
