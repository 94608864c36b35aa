"""`lora-gateway train --register`: a freshly trained adapter, served by the real vLLM via the gateway."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from adapters.train import TrainOptions, main
from tests.conftest import attached_settings, serve_app

pytestmark = [pytest.mark.engine, pytest.mark.train]

PROMPT = [{"role": "user", "content": "how many books have price above 40?"}]


def chat(url: str, model: str) -> str:
    body = {"model": model, "messages": PROMPT, "max_tokens": 16, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["choices"][0]["message"]["content"]


def test_trained_adapter_registers_and_changes_the_output(
    vllm_url: str, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path
) -> None:
    from adapters.demo_data import chat_row, split_requests, write_jsonl

    incoming = tmp_path / "incoming"
    rows = [chat_row(r, "sql") for r in split_requests(train=64, held_out=0)["train"]]
    data = write_jsonl(tmp_path / "sql.jsonl", rows)
    settings = attached_settings(
        vllm_url,
        cache_dir,
        tmp_path,
        registry={"allowed_roots": [str(incoming)], "seed_adapters_dir": False},
    )
    with serve_app(settings) as url:
        before = chat(url, "tiny-llama")
        options = TrainOptions(
            base=str(tiny_cache["base"]),
            data=data,
            out=incoming / "quick-sql",
            max_steps=20,
            batch_size=8,
            lr=5e-3,
            rank=8,
            alpha=16,
            seed=0,
            register=url,
            name="quick-sql",
        )
        main(options)
        models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        assert models["quick-sql"]["parent"] == "tiny-llama"
        adapted = chat(url, "quick-sql")
        assert adapted != before, f"20 steps of training must change the greedy output: {adapted!r}"
        assert chat(url, "tiny-llama") == before, "the base is untouched"
