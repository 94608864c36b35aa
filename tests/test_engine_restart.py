"""The managed vLLM dies: the gateway notices, answers 503/502 meanwhile, restarts it, restores adapters."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from tests.conftest import GatewayProcess

pytestmark = pytest.mark.engine


def vllm_processes(gateway: GatewayProcess) -> list[psutil.Process]:
    children = psutil.Process(gateway.proc.pid).children(recursive=False)
    return [p for p in children if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())]


def resident(gateway: GatewayProcess) -> set[str]:
    """What the gateway reports resident, checked against what vLLM itself lists."""
    [engine] = httpx.get(gateway.url + "/admin/engines").json()["data"]
    listed = {m["id"] for m in httpx.get(gateway.vllm_url + "/v1/models").json()["data"]}
    assert set(engine["resident_adapters"]) <= listed, "nothing is reported resident that vLLM lacks"
    return set(engine["resident_models"])


def test_killed_vllm_is_restarted_with_adapters_restored(gateway: GatewayProcess) -> None:
    [vllm] = vllm_processes(gateway)
    assert "--enable-lora" in vllm.cmdline() and "127.0.0.1" in vllm.cmdline()
    os.killpg(vllm.pid, signal.SIGKILL)

    # While it is down: clear errors, never a hang or an HTML page.
    deadline = time.monotonic() + 30
    while httpx.get(gateway.url + "/health").status_code == 200:
        assert time.monotonic() < deadline, "gateway never noticed that vLLM died"
        time.sleep(0.2)
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
