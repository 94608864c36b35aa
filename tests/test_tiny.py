"""The embedded base model is deterministic, idempotent to build, and usable by transformers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from adapters.tiny import TINY_SPEC, build_id, build_tiny, is_built, tiny_model_dir


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic_and_idempotent(
    tiny_cache: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real build pre-trains for minutes; the same code with a few steps shows it is deterministic.
    cached_id = build_id()
    monkeypatch.setitem(TINY_SPEC, "pretrain_steps", 6)
    assert build_id() != cached_id, "the pre-training length is part of the cache key"
    first, second = build_tiny(tmp_path / "one"), build_tiny(tmp_path / "two")
    assert first == tiny_model_dir(tmp_path / "one") and is_built(tmp_path / "one")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(first / name) == digest(second / name), f"{name} differs between two builds"
    assert digest(first / "tokenizer.json") == digest(tiny_cache["base"] / "tokenizer.json")
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert build_tiny(tmp_path / "one") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime, "a current cache is not rebuilt"


def test_tokenizer_and_chat_template(tiny_cache: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_cache["base"])
    assert tok.vocab_size <= int(TINY_SPEC["vocab_size"])
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|user|>" in text and text.endswith("<|assistant|>\n")
    ids = tok("show users older than 30").input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "show users older than 30"
