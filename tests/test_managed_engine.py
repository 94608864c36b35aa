"""How the managed vLLM is launched; the last test checks the session's running one (`engine`)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import httpx
import psutil
import pytest

from gateway.engines.managed import ManagedEngine, vllm_command, vllm_env
from gateway.settings import EngineSettings
from tests.conftest import ENGINE_AUTH, ENGINE_KEY, GatewayProcess


def test_command_has_lora_flags_loopback_and_extra_args() -> None:
    e = EngineSettings(
        port=8123,
        max_loras=3,
        max_lora_rank=32,
        max_cpu_loras=6,
        max_model_len=512,
        extra_args=["--dtype", "float32"],
    )
    cmd = vllm_command(e, "/models/base", "base")
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    pairs = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert pairs["--host"] == "127.0.0.1" and pairs["--port"] == "8123"
    assert pairs["--model"] == "/models/base" and pairs["--served-model-name"] == "base"
    assert "--enable-lora" in cmd
    i = cmd.index("--max-loras")
    assert cmd[i + 1] == "3"
    assert cmd[cmd.index("--max-lora-rank") + 1] == "32"
    assert cmd[cmd.index("--max-cpu-loras") + 1] == "6"
    assert cmd[cmd.index("--max-model-len") + 1] == "512"
    assert cmd[-2:] == ["--dtype", "float32"]


def test_env_allows_runtime_lora_updates_and_takes_overrides() -> None:
    env = vllm_env(EngineSettings(env={"VLLM_CPU_KVCACHE_SPACE": "2", "X": "y"}))
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["X"] == "y"


def test_env_tells_the_engine_plugin_which_lora_ops_to_use() -> None:
    assert vllm_env(EngineSettings())["LORA_GATEWAY_LORA_OPS"] == "grouped"
    env = vllm_env(EngineSettings(lora_ops="off", env={"LORA_GATEWAY_LORA_OPS": "fix"}))
    assert env["LORA_GATEWAY_LORA_OPS"] == "off", "engine.lora_ops is the one switch"
    assert vllm_env(EngineSettings())["LORA_GATEWAY_LORA_COMPILE"] == "1"
    env = vllm_env(EngineSettings(lora_compile=False, env={"LORA_GATEWAY_LORA_COMPILE": "1"}))
    assert env["LORA_GATEWAY_LORA_COMPILE"] == "0", "engine.lora_compile is the one switch"


def test_env_keeps_the_gateways_secrets_from_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "LORA_GATEWAY_AUTH__ADMIN_TOKEN": "admin-secret",
        "LORA_GATEWAY_AUTH__API_KEYS": '[{"key": "sk-secret"}]',
        "LORA_GATEWAY_REGISTRY__URL": "postgresql://gw:pw@db/registry",
        "LORA_GATEWAY_ADMIN_TOKEN": "cli-secret",
        "PGPASSWORD": "pg-secret",
        "VLLM_API_KEY": "inherited-key",
        "HF_TOKEN": "hf_for_gated_models",
    }.items():
        monkeypatch.setenv(name, value)
    env = vllm_env(EngineSettings(lora_ops="fix"), api_key="engine-key")
    plugin = ("LORA_GATEWAY_LORA_OPS", "LORA_GATEWAY_LORA_COMPILE")
    assert not [k for k in env if k.startswith(("LORA_GATEWAY_", "PG")) and k not in plugin]
    assert env["LORA_GATEWAY_LORA_OPS"] == "fix", "the engine plugin's switches stay"
    values = " ".join(env.values())
    for secret in ("admin-secret", "sk-secret", "cli-secret", "pg-secret"):
        assert secret not in values
    assert env["VLLM_API_KEY"] == "engine-key", "vLLM's --api-key is the gateway's, not an inherited one"
    assert env["HF_TOKEN"] == "hf_for_gated_models" and env["PATH"] == os.environ["PATH"]
    assert "VLLM_API_KEY" not in vllm_env(EngineSettings())


def test_the_key_stays_off_the_command_line() -> None:
    cmd = vllm_command(EngineSettings(api_key="engine-key"), "/models/base", "base")
    assert "engine-key" not in " ".join(cmd) and "--api-key" not in cmd


def test_each_start_gets_a_new_key_in_vllms_env_and_the_clients(caplog: pytest.LogCaptureFixture) -> None:
    """engine.api_key unset: every spawn draws a new key, gives it to the client for this engine's URL
    and to the child as VLLM_API_KEY, and logs it nowhere (a stand-in child prints what it got)."""

    class Keys:
        def __init__(self) -> None:
            self.given: list[tuple[str, str | None]] = []

        def authorize(self, base_url: str, api_key: str | None) -> None:
            self.given.append((base_url, api_key))

    async def main() -> list[str]:
        keys = Keys()
        engine = ManagedEngine("engine0", EngineSettings(port=8123), "/models/base", "base", keys)  # type: ignore[arg-type]
        engine.command = [sys.executable, "-c", "import os; print('child got', os.environ['VLLM_API_KEY'])"]
        for _ in range(2):
            await engine._spawn()
            assert engine.process is not None
            await engine.process.wait()
            await engine._reap()
        return [key or "" for _, key in keys.given] if {u for u, _ in keys.given} == {engine.base_url} else []

    with caplog.at_level(logging.INFO):
        first, second = asyncio.run(main())
    assert len(first) >= 32 and first != second, "a new key at each start"
    children = [r.getMessage() for r in caplog.records if r.name == "lora_gateway.vllm"]
    assert [m.rsplit(" ", 1)[1] for m in children] == [first, second]
    others = [r.getMessage() for r in caplog.records if r.name != "lora_gateway.vllm"]
    assert not [m for m in others if first in m or second in m], "the key is never logged"


@pytest.mark.engine
def test_vllm_refuses_calls_without_the_key_while_the_gateway_works(gateway: GatewayProcess) -> None:
    """The session's managed vLLM runs with its key (VLLM_API_KEY, not on its command line): straight to
    it, /v1 without the key is 401, loads included; through the gateway, which sends it, all works."""
    [vllm] = [
        p
        for p in psutil.Process(gateway.proc.pid).children()
        if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())
    ]
    assert ENGINE_KEY not in " ".join(vllm.cmdline())
    plugin = ("LORA_GATEWAY_LORA_OPS", "LORA_GATEWAY_LORA_COMPILE")
    assert not [k for k in vllm.environ() if k.startswith("LORA_GATEWAY_") and k not in plugin]
    load = {"lora_name": "intruder", "lora_path": "/tmp/any-weights"}
    for headers in ({}, {"authorization": "Bearer wrong-key"}):
        r = httpx.post(gateway.vllm_url + "/v1/load_lora_adapter", json=load, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert httpx.get(gateway.vllm_url + "/v1/models", headers=headers, timeout=30).status_code == 401
    listed = httpx.get(gateway.vllm_url + "/v1/models", headers=ENGINE_AUTH, timeout=30).json()["data"]
    assert "intruder" not in {m["id"] for m in listed}
    body = {"model": "demo-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["model"] == "demo-a", r.text
