"""Settings priority: defaults < config file (YAML or TOML) < environment < CLI flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LORA_GATEWAY_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = load_settings()
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.engine.mode == "managed" and s.engine.host == "127.0.0.1"
    assert s.base_model_name() == "tiny-llama"


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_priority_file_env_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    path = tmp_path / f"gw{suffix}"
    if suffix == ".yaml":
        path.write_text("port: 9001\nlog_level: debug\nengine:\n  max_loras: 3\n  port: 9100\n")
    else:
        path.write_text('port = 9001\nlog_level = "debug"\n[engine]\nmax_loras = 3\nport = 9100\n')
    s = load_settings(path)
    assert (s.port, s.log_level, s.engine.max_loras, s.engine.port) == (9001, "debug", 3, 9100)

    monkeypatch.setenv("LORA_GATEWAY_PORT", "9002")
    monkeypatch.setenv("LORA_GATEWAY_ENGINE__PORT", "9200")
    s = load_settings(path)
    assert (s.port, s.engine.port, s.engine.max_loras) == (9002, 9200, 3), "env beats file; nested merge"

    s = load_settings(path, port=9003, engine={"max_loras": 5, "port": None})
    assert (s.port, s.engine.max_loras, s.engine.port) == (9003, 5, 9200), "CLI beats env; None is ignored"


def test_adapters_registered_per_engine_default_above_what_vllm_keeps_in_memory() -> None:
    s = Settings(engine={"max_cpu_loras": 8})
    assert (s.max_resident(), s.preload_count()) == (64, 8)  # vLLM rereads the others from disk
    s = Settings(engine={"max_cpu_loras": 100})
    assert (s.max_resident(), s.preload_count()) == (100, 100)  # never fewer than vLLM keeps
    s = Settings(engine={"max_cpu_loras": 8}, registry={"max_resident": 4})
    assert (s.max_resident(), s.preload_count()) == (4, 4)  # set by hand: the gateway keeps only 4 loaded


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("port: 9009\n")
    monkeypatch.setenv("LORA_GATEWAY_CONFIG", str(path))
    assert load_settings().port == 9009


def test_bad_config_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "gw.ini"
    bad.write_text("x")
    with pytest.raises(ValueError, match=".yaml, .yml or .toml"):
        load_settings(bad)
    with pytest.raises(ValidationError, match="engine.url is required"):
        Settings(engine={"mode": "attached"})
    with pytest.raises(ValidationError, match="max_lora_rank"):
        Settings(engine={"max_lora_rank": 12})
    with pytest.raises(ValidationError, match="registry.max_resident"):
        Settings(registry={"max_resident": 0})
    typo = tmp_path / "typo.yaml"
    typo.write_text("prot: 1\n")
    with pytest.raises(ValidationError, match="prot"):
        load_settings(typo)
