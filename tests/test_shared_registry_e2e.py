"""Two gateways on one PostgreSQL registry and one adapter store see each other's changes."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from adapters.demo import RandomAdapterSpec, write_random_adapter
from tests.conftest import attached_settings, serve_app
from tests.pg import new_database

pytestmark = pytest.mark.engine


def models(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}


def wait_for(condition, what: str, timeout: float = 10) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_registrations_cross_gateways(
    postgres_url: str, vllm_url: str, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path
) -> None:
    database = new_database(postgres_url)
    shared_store = tmp_path / "store"  # the volume both gateways (and vLLM) mount
    source = tmp_path / "incoming" / "shared-x"
    write_random_adapter(tiny_cache["base"], source, RandomAdapterSpec("shared-x", seed=4242), "tiny-llama")

    def settings(name: str):  # noqa: ANN202
        return attached_settings(
            vllm_url,
            cache_dir,
            tmp_path / name,
            registry={
                "url": database,
                "store_dir": str(shared_store),
                "poll_interval_s": 0.3,
                "allowed_roots": [str(tmp_path / "incoming")],
                "seed_adapters_dir": False,
            },
        )

    with serve_app(settings("a")) as a, serve_app(settings("b")) as b:
        r = httpx.post(a + "/admin/adapters", json={"name": "shared-x", "source": str(source)}, timeout=60)
        assert r.status_code == 201, r.text
        wait_for(lambda: "shared-x" in models(b), "gateway b sees a's registration within seconds")
        body = {
            "model": "shared-x",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "temperature": 0,
        }
        via_a = httpx.post(a + "/v1/chat/completions", json=body, timeout=60).json()
        via_b = httpx.post(b + "/v1/chat/completions", json=body, timeout=60).json()
        assert via_b["model"] == "shared-x"
        assert via_a["choices"][0]["message"]["content"] == via_b["choices"][0]["message"]["content"]

        assert httpx.delete(b + "/admin/adapters/shared-x", timeout=60).status_code == 200
        wait_for(lambda: "shared-x" not in models(a), "gateway a sees b's removal within seconds")
        assert httpx.post(a + "/v1/chat/completions", json=body, timeout=60).status_code == 404
