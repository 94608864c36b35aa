"""Our train path in the benchmark: ``adapters.train.train_model``, the loop of ``lora-gateway train``.

The benchmark hands it the model it built on the GPU and a pre-tokenized dataset of synthetic
sequences, and times each optimizer step with a ``transformers.TrainerCallback`` (the device is
synchronised at the start and end of every step). Decoder-layer forward calls are counted with
hooks, so a run where checkpointing is skipped (a model left in eval mode, say) shows up as
``checkpointing_active: false`` in the report.

What this needs from ``adapters/train.py`` (see docs/training-benchmarks.md):

    train_model(model, tokenizer, dataset, options, *, callbacks=()) -> dict
    TrainOptions(rank=16, alpha=32, dropout=..., target_modules="all-linear" | [...],
                 batch_size=..., grad_accum=1, max_seq_len=..., max_steps=..., lr=...,
                 gradient_checkpointing=True, qlora=False, output_dir=..., seed=0, ...)
"""

from __future__ import annotations

import dataclasses
import inspect
import tempfile
import time
from collections.abc import Callable
from typing import Any

from adapters.bench.recipes import LORA_ALPHA, LORA_RANK, TARGETS, Case, count_layer_calls


def _step_timer(warmup: int, sync: Callable[[], None], calls: list[int]) -> tuple[Any, dict[str, Any]]:
    from transformers import TrainerCallback

    timing: dict[str, Any] = {"step_s": [], "losses": [], "layer_calls": 0}
    state_box: dict[str, float] = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            if state.global_step == warmup:
                calls[0] = 0
            state_box["t0"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            if state.global_step > warmup:  # global_step counts the step just finished
                timing["step_s"].append(time.perf_counter() - state_box["t0"])
                timing["layer_calls"] = calls[0]

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                timing["losses"].append(float(logs["loss"]))

    return StepTimer(), timing


def _options(train: Any, case: Case, total_steps: int, out_dir: str) -> Any:
    """``adapters.train.TrainOptions`` for the case, passing only the fields it has."""
    wanted = {
        "rank": LORA_RANK,
        "alpha": LORA_ALPHA,
        "target_modules": "all-linear" if case.targets == "all-linear" else list(TARGETS[case.targets]),
        "batch_size": case.micro_batch,
        "grad_accum": 1,
        "max_seq_len": case.seq,
        "max_steps": total_steps,
        "epochs": 1,
        "gradient_checkpointing": case.checkpointing > 0,
        "checkpoint_fraction": case.checkpointing if case.checkpointing > 0 else 1.0,
        "liger": case.liger,
        "dropout": 0.0,
        "qlora": case.method == "qlora",
        "output_dir": out_dir,
        "out": out_dir,
        "logging_steps": 1,
        "seed": 0,
    }
    options_cls = train.TrainOptions
    names = (
        {f.name for f in dataclasses.fields(options_cls)} if dataclasses.is_dataclass(options_cls) else None
    )
    if names is None:
        names = set(inspect.signature(options_cls).parameters)
    return options_cls(**{k: v for k, v in wanted.items() if k in names})


def unavailable() -> str | None:
    """Why our train path cannot run here, or None when it can."""
    try:
        from adapters import train
    except ImportError as exc:
        return f"our train path is not importable: {exc}"
    if not hasattr(train, "train_model") or not hasattr(train, "TrainOptions"):
        return "adapters.train exposes no train_model(model, tokenizer, dataset, options) and TrainOptions"
    return None


def run_ours(
    model: Any, case: Case, batches: list[Any], warmup: int, steps: int, sync: Callable[[], None]
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Train ``model`` with ``adapters.train.train_model`` for ``warmup + steps`` steps, timed."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    from adapters import train

    total = warmup + steps
    rows = [{"input_ids": b[i].tolist()} for b in batches for i in range(b.shape[0])]
    rows = (rows * (total * case.micro_batch // len(rows) + 1))[: total * case.micro_batch]
    calls = count_layer_calls(model)
    timer, timing = _step_timer(warmup, sync, calls)
    with tempfile.TemporaryDirectory(prefix="train-bench-") as out_dir:
        options = _options(train, case, total, out_dir)
        report = train.train_model(model, None, rows, options, callbacks=[timer])
    if len(timing["step_s"]) != steps:
        raise RuntimeError(f"expected {steps} timed steps, the callback saw {len(timing['step_s'])}")
    report = report if isinstance(report, dict) else {}
    notes = {"options": {k: v for k, v in vars(options).items() if k not in ("output_dir", "out")}}
    trainable = int(report.get("trainable_params", 0) or 0)
    return timing, notes, trainable
