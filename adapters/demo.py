"""Demo adapters for the embedded tiny base: PEFT LoRA folders with random, non-zero weights.

They exist so that `make serve` has adapters to serve and the tests have outputs that differ from the
base. Each adapter is plain PEFT on disk (`adapter_config.json` + `adapter_model.safetensors`), written
with numpy + safetensors (no torch, no PEFT needed), deterministic from its seed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEMO_VERSION = 1


@dataclass(frozen=True)
class RandomAdapterSpec:
    name: str
    seed: int
    rank: int = 8
    alpha: int = 16
    scale: float = 0.08
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )


DEMO_ADAPTERS = (RandomAdapterSpec("demo-a", seed=11), RandomAdapterSpec("demo-b", seed=22))


def module_shapes(base_config: dict) -> dict[str, tuple[str, int, int]]:
    """Linear modules of a Llama decoder layer: name -> (parent, in_features, out_features)."""
    hidden = base_config["hidden_size"]
    inter = base_config["intermediate_size"]
    heads = base_config["num_attention_heads"]
    kv_heads = base_config.get("num_key_value_heads", heads)
    head_dim = base_config.get("head_dim") or hidden // heads
    return {
        "q_proj": ("self_attn", hidden, heads * head_dim),
        "k_proj": ("self_attn", hidden, kv_heads * head_dim),
        "v_proj": ("self_attn", hidden, kv_heads * head_dim),
        "o_proj": ("self_attn", heads * head_dim, hidden),
        "gate_proj": ("mlp", hidden, inter),
        "up_proj": ("mlp", hidden, inter),
        "down_proj": ("mlp", inter, hidden),
    }


def write_random_adapter(base_dir: Path, out_dir: Path, spec: RandomAdapterSpec, base_name: str) -> Path:
    """Write one random LoRA adapter for the base in `base_dir` into `out_dir` (atomically)."""
    import numpy as np
    from safetensors.numpy import save_file

    config = json.loads((Path(base_dir) / "config.json").read_text())
    shapes = module_shapes(config)
    rng = np.random.default_rng(spec.seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in spec.target_modules:
            parent, fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            a = rng.normal(0.0, spec.scale, size=(spec.rank, fan_in)).astype(np.float32)
            b = rng.normal(0.0, spec.scale, size=(fan_out, spec.rank)).astype(np.float32)
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(spec.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        (tmp / "README.md").write_text(
            f"# {spec.name}\n\nRandom LoRA demo adapter (seed {spec.seed}) for `{base_name}`.\n"
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def demo_adapters_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "demo-adapters"


def build_demo_adapters(cache_dir: Path, base_dir: Path, base_name: str) -> dict[str, Path]:
    """Write the demo adapters under `<cache_dir>/demo-adapters/` unless already there (idempotent)."""
    root = demo_adapters_dir(cache_dir)
    stamp = f"{DEMO_VERSION}:{(Path(base_dir) / 'BUILD_ID').read_text().strip()}"
    out: dict[str, Path] = {}
    for spec in DEMO_ADAPTERS:
        folder = root / spec.name
        marker = folder / ".demo-stamp"
        if not (marker.is_file() and marker.read_text() == stamp):
            write_random_adapter(base_dir, folder, spec, base_name)
            marker.write_text(stamp)
        out[spec.name] = folder
    return out
