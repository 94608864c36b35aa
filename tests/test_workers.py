"""gateway/workers.py's settings for the workers (the processes themselves: tests/test_workers_e2e.py)."""

from __future__ import annotations

from pathlib import Path

from gateway.settings import Settings
from gateway.workers import settings_file, with_engine_key, worker_settings


def test_workers_attach_to_the_managed_replicas_with_one_key_and_do_not_seed(tmp_path: Path) -> None:
    settings = with_engine_key(Settings(data_dir=tmp_path, engine={"replicas": 2, "port": 9100}))
    assert settings.engine.api_key is not None, "the parent's vLLM and the workers share one chosen key"
    w = worker_settings(settings)
    assert w.engine.mode == "attached"
    assert w.engine.attached_urls() == ["http://127.0.0.1:9100", "http://127.0.0.1:9101"]
    assert w.engine.api_key == settings.engine.api_key
    assert not w.registry.seed_adapters_dir and settings.registry.seed_adapters_dir
    sized = settings.lora_sizing()  # the workers count what the parent's vLLM was started with
    assert (w.batch_loras(), w.cpu_loras()) == (sized.max_loras, sized.cpu_loras) != (1, 1)
    assert w.max_resident() == settings.max_resident() and w.preload_count() == settings.preload_count()
    configured = Settings(data_dir=tmp_path, engine={"api_key": "mine"})
    assert with_engine_key(configured).engine.api_key == configured.engine.api_key


def test_attached_settings_pass_through_and_the_file_is_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, engine={"mode": "attached", "url": "http://vllm:8000"})
    assert with_engine_key(settings) is settings
    w = worker_settings(settings)
    assert w.engine.attached_urls() == ["http://vllm:8000"]
    with settings_file(w) as path:
        assert path.stat().st_mode & 0o077 == 0, "it holds the engine and admin keys"
        kept = path
    assert not kept.exists()
