"""Merge a LoRA adapter into its base: a full model that vLLM serves without `--enable-lora`.

    lora-gateway merge --base .cache/models/tiny-llama --adapter out/sql --out out/sql-merged

The output folder holds `config.json`, `model.safetensors` (the base's dtype), the tokenizer files with
the chat template, the generation config, and `merge_info.json` (base, adapter, fingerprints). It is
written into a temporary folder beside `--out` and moved into place at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from adapters.artifacts import atomic_output, check_output, fingerprint_folder, resolve_base


def load_base_and_adapter(base: str | Path, adapter: str | Path, dtype: Any = None) -> tuple[Any, Any]:
    """(PeftModel of base + adapter in eval mode, tokenizer)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = resolve_base(base)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype or "auto")
    model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, tokenizer


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write base + adapter merged into one model at `out`; return `out`."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    check_output(Path(out), overwrite)
    base_dir = resolve_base(base)
    model, tokenizer = load_base_and_adapter(base_dir, adapter)
    merged = model.merge_and_unload()
    with atomic_output(Path(out), overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name in ("generation_config.json", "chat_template.jinja"):
            if (base_dir / name).is_file() and not (tmp / name).exists():
                shutil.copy2(base_dir / name, tmp / name)
        info = {
            "base": str(base),
            "base_fingerprint": fingerprint_folder(base_dir),
            "adapter": str(adapter.resolve()),
            "adapter_fingerprint": fingerprint_folder(adapter),
            "adapter_config": json.loads((adapter / "adapter_config.json").read_text()),
        }
        (tmp / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return Path(out)
