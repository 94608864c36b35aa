"""A client that leaves mid-stream makes vLLM stop generating (the gateway closes the upstream)."""

from __future__ import annotations

import re
import time

import httpx
import pytest

pytestmark = pytest.mark.engine


def vllm_running_requests(vllm_url: str) -> float:
    text = httpx.get(vllm_url + "/metrics", timeout=10).text
    values = [float(m) for m in re.findall(r"^vllm:num_requests_running\{[^}]*\} ([0-9.e+-]+)$", text, re.M)]
    assert values, "vLLM exposes vllm:num_requests_running"
    return sum(values)


def test_client_disconnect_aborts_generation_in_vllm(gateway_url: str, vllm_url: str) -> None:
    body = {
        "model": "demo-a",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 1000,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", gateway_url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):  # a few chunks arrive as they are generated, not all at the end
            next(lines)
        assert vllm_running_requests(vllm_url) >= 1
    # The client has gone. 1000 tokens take far longer than this on the tiny model on a CPU.
    deadline = time.monotonic() + 5
    while vllm_running_requests(vllm_url) > 0:
        assert time.monotonic() < deadline, "vLLM kept generating for a client that left"
        time.sleep(0.1)
