"""Settings priority: defaults < config file (YAML or TOML) < environment < CLI flags."""

from __future__ import annotations

import json
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


def test_vllms_adapter_limits_are_sized_from_memory_when_unset(tmp_path: Path) -> None:
    """A rank-16 LoRA of Llama 3 8B (bfloat16) is 80 MiB: 2 GiB of batch slots hold 25, 10% of a 512 GiB
    host 655. Of the embedded tiny base, 0.53 MiB: both caps. What is set stays."""
    from gateway.engines.sizing import FALLBACK_CPU_LORAS, FALLBACK_LORAS, MAX_AUTO_CPU_LORAS, size_loras

    gib, size = 2**30, 80 * 2**20
    llama8b = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
               "dtype": "bfloat16", "num_key_value_heads": 8, "vocab_size": 128256,
               "num_hidden_layers": 32}  # fmt: skip
    model = tmp_path / "llama-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(llama8b))

    def size_for(memory: int, **kw: int) -> tuple[int, int]:
        got = size_loras(size, rank=16, slots_bytes=2 * gib, cache_fraction=0.1, memory_bytes=memory, **kw)
        return got.max_loras, got.cpu_loras

    assert size_for(512 * gib) == (25, 655)
    assert size_for(2 * gib) == (25, 25), "never fewer in memory than in a batch"
    assert size_for(512 * gib, max_loras=4) == (4, 655) and size_for(512 * gib, cpu_loras=8) == (8, 8)
    tiny = size_loras(2**19, rank=16, slots_bytes=2 * gib, cache_fraction=0.1, memory_bytes=24 * gib)
    assert (tiny.max_loras, tiny.cpu_loras) == (32, MAX_AUTO_CPU_LORAS) and "0.50 MiB" in tiny.how
    unknown = size_loras(None, rank=16, slots_bytes=2 * gib, cache_fraction=0.1)
    assert (unknown.max_loras, unknown.cpu_loras) == (FALLBACK_LORAS, FALLBACK_CPU_LORAS)

    s = Settings(engine={"model": str(model)}, cache_dir=tmp_path)
    assert s.batch_loras() == 25 and "80.00 MiB" in s.lora_sizing().how
    assert s.max_resident() == max(64, s.cpu_loras()) and s.preload_count() == s.cpu_loras()
    fixed = Settings(engine={"model": str(model), "max_cpu_loras": 12, "max_loras": 3}, cache_dir=tmp_path)
    assert (fixed.batch_loras(), fixed.cpu_loras()) == (3, 12)
    attached = Settings(engine={"mode": "attached", "url": "http://127.0.0.1:9"})
    assert (attached.batch_loras(), attached.cpu_loras()) == (1, 1), "attached and unset: vLLM's defaults"
    missing = Settings(engine={"model": str(tmp_path / "nowhere/none")}, cache_dir=tmp_path)
    assert missing.cpu_loras() == FALLBACK_CPU_LORAS
    other = s.model_copy(update={"engine": s.engine.model_copy(update={"max_loras": 7})})
    assert other.batch_loras() == 7, "a copy with other engine settings is sized again, not from the cache"


def test_the_managed_vllm_gets_the_sized_cache(tmp_path: Path) -> None:
    from gateway.engines.managed import ManagedEngine
    from gateway.engines.pool import EnginePool

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128,
                                                   "num_attention_heads": 2, "vocab_size": 100,
                                                   "num_hidden_layers": 1, "dtype": "float32"}))  # fmt: skip
    s = Settings(engine={"model": str(model), "lora_cache_memory": 0.001}, cache_dir=tmp_path)
    pool = EnginePool(s, client=None)  # type: ignore[arg-type]
    (engine,) = pool.engines
    assert isinstance(engine, ManagedEngine)
    argv = engine.command
    assert argv[argv.index("--max-cpu-loras") + 1] == str(s.cpu_loras())
    assert argv[argv.index("--max-loras") + 1] == str(s.batch_loras()) == "32"
    assert s.cpu_loras() not in (4, 64) and s.cpu_loras() > s.batch_loras()


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
