"""How the managed vLLM is launched (the process itself runs in the end-to-end tests)."""

from __future__ import annotations

from gateway.engines.managed import vllm_command, vllm_env
from gateway.settings import EngineSettings


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
