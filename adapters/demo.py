"""The demo adapters: LoRA adapters trained on the embedded tiny base, one per demo task.

- `demo-a` answers a request with its SQL query (task ``sql``);
- `demo-b` restates it in pirate speak (task ``pirate``).

Both are trained by the same code as `lora-gateway train` (`adapters.train.main`) on the generated
datasets shipped in `adapters/datasets/` (see `adapters.demo_data`), with `DEMO_RECIPE`, and are plain
PEFT folders vLLM accepts (peft_type LORA, r 16, attention and MLP projections, safetensors). Each
folder holds its `training_report.json` (base vs adapter on its held-out set) and `loss.png`.

`build_demo_adapters` trains them once and caches them under `<cache_dir>/demo-adapters/`, keyed by
the base's build id, the recipe and the data; `demo-adapters/demo_eval.json` then records the exact
match of the base and of each adapter on each held-out set, measured in process with transformers
(greedy). The same numbers through a running gateway:

    lora-gateway evaluate --url http://localhost:8000 --model demo-a \
        --data adapters/datasets/sql/held_out.jsonl

`write_random_adapter` also writes untrained adapters with random weights, for tests and load tests
that need many distinct adapters quickly.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.artifacts import atomic_output
from adapters.llama import BLOCKS, LINEAR_MODULES, linear_shapes

DEMO_VERSION = 2

#: TrainOptions for both demo adapters (CPU-sized: a couple of minutes each on 2 cores).
DEMO_RECIPE: dict[str, Any] = {
    "rank": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": list(LINEAR_MODULES),
    "lr": 2e-3,
    "batch_size": 32,
    "max_steps": 250,
    "warmup_ratio": 0.1,
    "lr_scheduler": "linear",
    "seed": 0,
    "logging_steps": 10,
    "eval_max_examples": 100,
    "max_new_tokens": 32,
    "precision": "fp32",
}


#: Torch threads while training them: one is about as fast as two for matrices this small, and stays
#: fast when another process holds a core (see adapters/tiny.py).
DEMO_THREADS = 1


@contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    task: str


DEMO_ADAPTERS = (DemoAdapter("demo-a", "sql"), DemoAdapter("demo-b", "pirate"))


# --------------------------------------------------------------------------- random adapters
# Untrained LoRA folders with random, non-zero weights (numpy + safetensors, no torch): cheap stand-ins
# for tests and load tests that need many distinct adapters rather than useful ones.


@dataclass(frozen=True)
class RandomAdapterSpec:
    name: str
    seed: int
    rank: int = 8
    alpha: int = 16
    scale: float = 0.08
    target_modules: tuple[str, ...] = LINEAR_MODULES


def write_random_adapter(base_dir: Path, out_dir: Path, spec: RandomAdapterSpec, base_name: str) -> Path:
    """Write one random LoRA adapter for the base in `base_dir` into `out_dir` (atomically)."""
    import numpy as np
    from safetensors.numpy import save_file

    config = json.loads((Path(base_dir) / "config.json").read_text())
    shapes = linear_shapes(config)
    rng = np.random.default_rng(spec.seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in spec.target_modules:
            fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{BLOCKS[module]}.{module}"
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
    with atomic_output(out_dir, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        (tmp / "README.md").write_text(
            f"# {spec.name}\n\nRandom LoRA demo adapter (seed {spec.seed}) for `{base_name}`.\n"
        )
    return out_dir


# --------------------------------------------------------------------------- trained demo adapters


def demo_adapters_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "demo-adapters"


def demo_datasets(cache_dir: Path) -> Path:
    """The folder holding `<task>/{train,held_out}.jsonl`: the shipped copy, else generated into the cache."""
    from adapters.demo_data import TASKS, shipped_datasets_dir, write_demo_datasets

    shipped = shipped_datasets_dir()
    if all(
        (shipped / task / f"{split}.jsonl").is_file() for task in TASKS for split in ("train", "held_out")
    ):
        return shipped
    generated = Path(cache_dir) / "demo-datasets"
    write_demo_datasets(generated)
    return generated


def _stamp(base_dir: Path, data_dir: Path, adapter: DemoAdapter) -> str:
    digest = hashlib.sha256()
    digest.update(
        json.dumps({"v": DEMO_VERSION, "recipe": DEMO_RECIPE, "name": adapter.name}, sort_keys=True).encode()
    )
    digest.update((Path(base_dir) / "BUILD_ID").read_bytes())
    for split in ("train", "held_out"):
        digest.update((data_dir / adapter.task / f"{split}.jsonl").read_bytes())
    return digest.hexdigest()[:16]


def build_demo_adapters(cache_dir: Path, base_dir: Path, base_name: str) -> dict[str, Path]:
    """Train the demo adapters under `<cache_dir>/demo-adapters/` unless current there (idempotent).

    Each adapter trains on one thread; with two or more cores, both train at once in two processes."""
    root = demo_adapters_dir(cache_dir)
    data_dir = demo_datasets(cache_dir)
    out = {adapter.name: root / adapter.name for adapter in DEMO_ADAPTERS}
    todo = []
    for adapter in DEMO_ADAPTERS:
        stamp = _stamp(base_dir, data_dir, adapter)
        marker = out[adapter.name] / ".demo-stamp"
        if not (marker.is_file() and marker.read_text() == stamp):
            todo.append((adapter, marker, stamp))
    jobs = [(str(base_dir), str(data_dir), str(out[a.name]), a.task, base_name) for a, _, _ in todo]
    if len(jobs) > 1 and (os.cpu_count() or 1) > 1:
        _train_in_subprocesses(jobs)
    else:
        for job in jobs:
            _train_demo(*job)
    for _, marker, stamp in todo:
        marker.write_text(stamp)
    if todo or not (root / "demo_eval.json").is_file():
        with _threads(DEMO_THREADS):
            scores = cross_evaluate(base_dir, out, data_dir)
        (root / "demo_eval.json").write_text(json.dumps(scores, indent=2) + "\n")
    return out


def _train_in_subprocesses(jobs: list[tuple[str, ...]]) -> None:
    """One Python process per adapter (not multiprocessing: it would re-run the caller's main module)."""
    code = "import json, sys; from adapters.demo import _train_demo; _train_demo(*json.loads(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(job)]) for job in jobs]
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise RuntimeError(f"training the demo adapters failed (exit codes {codes}); see the output above")


def _train_demo(base_dir: str, data_dir: str, folder: str, task: str, base_name: str) -> None:
    """Train one demo adapter with `lora-gateway train`'s code (a process of its own, or this one)."""
    from adapters.train import TrainOptions, main

    options = TrainOptions(
        base=base_dir,
        data=Path(data_dir) / task / "train.jsonl",
        eval=Path(data_dir) / task / "held_out.jsonl",
        out=Path(folder),
        base_name=base_name,
        overwrite=True,
        **DEMO_RECIPE,
    )
    with _threads(DEMO_THREADS):
        main(options)


def cross_evaluate(base_dir: Path, adapters: dict[str, Path], data_dir: Path) -> dict[str, Any]:
    """Exact match (greedy) of the base and of every demo adapter on every demo task's held-out set."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.data import load_jsonl
    from adapters.evaluate import evaluate_model

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    held_out = {a.task: load_jsonl(data_dir / a.task / "held_out.jsonl") for a in DEMO_ADAPTERS}
    started = time.perf_counter()
    table: dict[str, dict[str, float | None]] = {}
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    table["base"] = {
        task: evaluate_model(model, tokenizer, ds, max_new_tokens=32).exact_match
        for task, ds in held_out.items()
    }
    for name, folder in adapters.items():
        with_adapter = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir), str(folder)
        ).eval()
        table[name] = {
            task: evaluate_model(with_adapter, tokenizer, ds, max_new_tokens=32).exact_match
            for task, ds in held_out.items()
        }
    return {
        "metric": "exact match, greedy, in process (transformers), held-out sets of adapters/datasets",
        "tasks": {a.task: a.name for a in DEMO_ADAPTERS},
        "examples": {task: ds.examples for task, ds in held_out.items()},
        "exact_match": table,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def demo_scores(cache_dir: Path) -> dict[str, Any]:
    """The recorded cross-evaluation (`demo_eval.json`), or {} before the adapters are built."""
    path = demo_adapters_dir(cache_dir) / "demo_eval.json"
    return json.loads(path.read_text()) if path.is_file() else {}
