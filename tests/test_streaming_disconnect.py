"""A client that leaves mid-stream makes vLLM stop generating (the gateway closes the upstream)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.registry_helpers import engine

pytestmark = pytest.mark.engine

N = 16  # sequences of nearly the model's context each: many seconds of generation on this CPU


@pytest.fixture
def context(tiny_cache: dict[str, Path]) -> int:
    return json.loads((tiny_cache["base"] / "config.json").read_text())["max_position_embeddings"]


def generated_tokens(vllm_url: str) -> float:
    text = httpx.get(vllm_url + "/metrics", timeout=10).text
    values = re.findall(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)$", text, re.M)
    assert values, "vLLM exposes vllm:generation_tokens_total"
    return sum(float(v) for v in values)


def settled_tokens(vllm_url: str, timeout: float = 30) -> float:
    """vLLM's generated-token count once it stops moving (nothing left running)."""
    deadline = time.monotonic() + timeout
    last, stable_since = generated_tokens(vllm_url), time.monotonic()
    while time.monotonic() - stable_since < 1.5:
        assert time.monotonic() < deadline, "vLLM kept generating"
        time.sleep(0.25)
        now = generated_tokens(vllm_url)
        if now != last:
            last, stable_since = now, time.monotonic()
    return last


def running_requests(vllm_url: str) -> float:
    text = httpx.get(vllm_url + "/metrics", timeout=10).text
    values = re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M)
    assert values, "vLLM exposes vllm:num_requests_running"
    return sum(float(v) for v in values)


def test_client_disconnect_aborts_generation_in_vllm(gateway_url: str, vllm_url: str, context: int) -> None:
    """The client leaves at the first streamed bytes, or once the gateway has held the request on the
    engine for 0.3 s (on a busy 2-core CPU vLLM's frontend may deliver the first events late), and the
    request is far more than the tiny model can generate in that time."""
    requested = N * (context - 64)
    body = {
        "model": "demo-a",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": context - 64,
        "n": N,
        "temperature": 1.0,
        "seed": 1,
        "ignore_eos": True,
        "stream": True,
    }
    before = settled_tokens(vllm_url)
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", gateway_url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        # Either sign that vLLM generates: the first streamed bytes (sent once it has a token), or the
        # gateway holding the request on the engine for 0.3 s (read from the gateway, which answers at once;
        # vLLM's /metrics may answer seconds late while it holds both cores: in one CI run 30 s of polls
        # never saw its gauge move, in another the generation had ended before a poll came back).
        first_bytes = threading.Event()

        def read_first() -> None:
            try:
                next(r.iter_raw(), b"")
                first_bytes.set()
            except Exception:  # the stream closed under it: the client left first
                return

        reader = threading.Thread(target=read_first, daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        sent_at: float | None = None
        while not first_bytes.is_set():
            assert time.monotonic() < deadline, "the gateway never sent the request, or vLLM never ran it"
            if sent_at is None and sum(engine(gateway_url)["in_flight"].values()):
                sent_at = time.monotonic()
            if sent_at is not None and time.monotonic() - sent_at >= 0.3:
                break
            first_bytes.wait(0.01)
    at_leave = generated_tokens(vllm_url)
    deadline = time.monotonic() + 5
    while running_requests(vllm_url) > 0:
        assert time.monotonic() < deadline, "vLLM still runs the request 5 s after the client left"
        time.sleep(0.05)
    after = settled_tokens(vllm_url)
    assert after - before < requested, (
        f"the generation ran to its end after the client left ({at_leave - before:.0f} tokens before)"
    )
    assert after - at_leave < 0.25 * requested, (
        f"vLLM generated {after - at_leave:.0f} tokens after the client left, {at_leave - before:.0f} before"
    )


def test_a_non_streaming_client_that_leaves_aborts_generation_in_vllm(
    gateway_url: str, vllm_url: str, context: int
) -> None:
    """Nothing reaches a non-streaming client before vLLM has finished; one that leaves meanwhile (a client
    timeout) makes the gateway drop its call, and vLLM aborts. Timed by vLLM's own gauge, as above."""
    requested = N * (context - 64)
    body = {"model": "demo-b", "prompt": "hello", "max_tokens": context - 64, "n": N, "temperature": 1.0,
            "seed": 2, "ignore_eos": True}  # fmt: skip
    host, port = gateway_url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    before = settled_tokens(vllm_url)
    with socket.create_connection((host, int(port))) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        sock.sendall(head.encode() + f"content-length: {len(data)}\r\n\r\n".encode() + data)
        # The start is read from the gateway (its lease on demo-b), not from vLLM's gauge: while vLLM
        # generates on both cores its /metrics answers seconds late, after a short request has ended.
        deadline = time.monotonic() + 30
        while not sum(engine(gateway_url)["in_flight"].values()):
            assert time.monotonic() < deadline, "the gateway never sent the request"
            time.sleep(0.01)
        time.sleep(0.3)  # vLLM has scheduled it
    left = time.monotonic()
    at_leave = generated_tokens(vllm_url)
    while running_requests(vllm_url) > 0:
        assert time.monotonic() - left < 5, "vLLM still runs the request 5 s after the client left"
        time.sleep(0.01)
    print(
        f"\nvLLM stopped running the request {1000 * (time.monotonic() - left):.0f} ms after the client left"
    )
    after = settled_tokens(vllm_url)
    assert after > before, "vLLM never ran the request"  # the start was read from the gateway
    assert after - before < requested, "the generation ran to its end after the client left"
    assert after - at_leave < 0.25 * requested, (
        f"vLLM generated {after - at_leave:.0f} tokens after the client left, {at_leave - before:.0f} before"
    )
