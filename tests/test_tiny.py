"""The embedded base model is deterministic, idempotent to build, and usable by transformers."""

from __future__ import annotations

import hashlib
from pathlib import Path

from adapters.tiny import TINY_SPEC, build_tiny, is_built, tiny_model_dir


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic_and_idempotent(tiny_cache: dict[str, Path], tmp_path: Path) -> None:
    cached = tiny_cache["base"]
    built = build_tiny(tmp_path)
    assert built == tiny_model_dir(tmp_path) and is_built(tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(built / name) == digest(cached / name), f"{name} differs between two builds"
    mtime = (built / "model.safetensors").stat().st_mtime_ns
    assert build_tiny(tmp_path) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == mtime, "a current cache is not rebuilt"


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
