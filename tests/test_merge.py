"""`lora-gateway merge`: the merged model computes what base + adapter compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.merge import load_base_and_adapter, merge_adapter


@pytest.fixture(scope="session")
def tiny_base(cache_dir: Path) -> Path:
    from adapters.tiny import build_tiny

    return build_tiny(cache_dir)


@pytest.fixture(scope="module")
def adapter_dir(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with non-zero weights on every linear layer (as training would leave it)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def test_merged_logits_match_base_plus_adapter(tiny_base: Path, adapter_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge_adapter(tiny_base, adapter_dir, tmp_path / "merged")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "merge_info.json"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    assert not list(tmp_path.glob(".merged.tmp-*")), "the temporary folder is cleaned up"

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_base).chat_template
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with_adapter, _ = load_base_and_adapter(tiny_base, adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "how many users have age above 42?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = with_adapter(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert (want - plain).abs().max().item() > 1e-2, (
        "the adapter must change the logits for this test to mean anything"
    )
    # fp32 here; bf16 rounding of the merged weights would be ~1e-2 on logits of this size.
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    info = json.loads((out / "merge_info.json").read_text())
    assert info["base_fingerprint"].startswith("sha256:") and info["adapter_config"]["r"] == 8


def test_merge_refuses_bad_inputs(tiny_base: Path, adapter_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"):
        merge_adapter(tiny_base, tmp_path, tmp_path / "out")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        merge_adapter(tiny_base, adapter_dir, taken)
    assert (taken / "keep.txt").read_text() == "mine"
