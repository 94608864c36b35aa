"""The reusable training loop: a model already in memory in, a trained LoRA adapter and its numbers out.

    train_model(model, tokenizer, dataset, options, *, callbacks=()) -> dict

`model` is a transformers causal LM already on its device (any dtype, or bitsandbytes 4-bit) or a
`PeftModel`; a plain model is wrapped in a fresh LoRA adapter from `options` (call `wrap_lora` first
to keep the `PeftModel`, as `adapters.train.main` does to save it).
`dataset` is a list of dicts or a `datasets.Dataset` in a shape TRL's `SFTTrainer` / `DPOTrainer`
accepts (see `adapters.data.to_trl_rows`), or pre-tokenized rows with `input_ids`, in which case
`tokenizer` may be None. `callbacks` are `transformers.TrainerCallback`s. The result is the
JSON-ready training summary (steps, wall time, tokens/s, peak memory, trainable parameters, the
Trainer's log history). Nothing is written outside a scratch folder, so a benchmark can time it.

Gradient checkpointing, when asked, really runs: the model is put in training mode (a model from
`from_pretrained` is in eval mode, where transformers skips checkpointing), non-reentrant, enabled on
the model before the Trainer is built and only on the first `checkpoint_fraction` of the decoder
layers; the Trainer is told not to re-enable it on every layer.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

ALL_LINEAR = "all-linear"


class LoraOptions(Protocol):
    """What the training loop reads from its options (`adapters.train.TrainOptions` has all of it)."""

    method: str
    rank: int
    alpha: int
    dropout: float
    target_modules: list[str]
    epochs: float
    max_steps: int
    lr: float
    batch_size: int
    grad_accum: int
    max_seq_len: int
    seed: int
    gradient_checkpointing: bool
    checkpoint_fraction: float
    liger: bool
    dpo_beta: float
    warmup_ratio: float
    lr_scheduler: str
    logging_steps: int
    precision: str


def lora_config(options: LoraOptions) -> Any:
    from peft import LoraConfig

    targets = options.target_modules
    target: str | list[str] = ALL_LINEAR if list(targets) == [ALL_LINEAR] else list(targets)
    return LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=target,
        bias="none",
        task_type="CAUSAL_LM",
    )


def wrap_lora(model: Any, options: LoraOptions) -> Any:
    """`model` with a fresh LoRA adapter (seeded), or `model` itself when it already is a PeftModel."""
    from peft import PeftModel, get_peft_model
    from transformers import set_seed

    if isinstance(model, PeftModel):
        return model
    set_seed(options.seed)
    return get_peft_model(model, lora_config(options))


def decoder_layers(model: Any) -> list[Any]:
    """The modules transformers checkpoints (decoder layers), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_gradient_checkpointing(model: Any, fraction: float = 1.0) -> int:
    """Non-reentrant checkpointing on the first `fraction` of the decoder layers, in training mode.

    Returns how many layers are checkpointed."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False
    layers = decoder_layers(model)
    keep = round(len(layers) * fraction)
    for layer in layers[keep:]:
        layer.gradient_checkpointing = False
    model.train()
    return keep


def _precision(options: LoraOptions) -> dict[str, bool]:
    import torch

    cuda = torch.cuda.is_available()
    choice = options.precision
    if choice == "auto":
        choice = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": choice == "bf16", "fp16": choice == "fp16", "use_cpu": not cuda}


def trainer_args(options: LoraOptions, work_dir: Path, has_eval: bool) -> Any:
    """The TRL config (SFTConfig or DPOConfig) for these options."""
    from trl import DPOConfig, SFTConfig

    common: dict[str, Any] = {
        "output_dir": str(work_dir),
        "num_train_epochs": options.epochs,
        "max_steps": options.max_steps,
        "learning_rate": options.lr,
        "per_device_train_batch_size": options.batch_size,
        "per_device_eval_batch_size": options.batch_size,
        "gradient_accumulation_steps": options.grad_accum,
        "lr_scheduler_type": options.lr_scheduler,
        "warmup_steps": options.warmup_ratio,
        "seed": options.seed,
        "data_seed": options.seed,
        "logging_steps": options.logging_steps,
        "logging_first_step": True,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": False,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": 0.1 if has_eval else None,
        "include_num_input_tokens_seen": "non_padding",
        # Enabled on the model by `enable_gradient_checkpointing` (partial, non-reentrant); the Trainer
        # would re-enable it on every layer.
        "gradient_checkpointing": False,
        "max_length": options.max_seq_len,
        "dataloader_num_workers": 0,
        **_precision(options),
    }
    if options.method == "dpo":
        return DPOConfig(beta=options.dpo_beta, **common)
    return SFTConfig(packing=False, use_liger_kernel=options.liger, **common)


def _as_dataset(rows: Any) -> Any:
    if rows is None or not isinstance(rows, list):
        return rows
    from datasets import Dataset

    return Dataset.from_list(rows)


def placeholder_tokenizer(model: Any) -> Any:
    """A stand-in for pre-tokenized data: only the pad and end-of-sequence ids matter to the collator."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    config = model.config
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
    pad = config.pad_token_id if isinstance(config.pad_token_id, int) else eos
    vocab = {"<pad>": pad} if pad == eos else {"<pad>": pad, "</s>": eos}
    vocab.setdefault("</s>", eos)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<pad>"
    )


def _peak_memory() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"kind": "cuda_max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated())}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": "process_peak_rss", "bytes": int(rss if sys.platform == "darwin" else rss * 1024)}


def loss_progress_callback() -> Any:
    """transformers' progress bar (steps, rate, ETA) with the latest train and eval loss beside it."""
    from transformers.trainer_callback import ProgressCallback

    class LossProgressCallback(ProgressCallback):
        shown: dict[str, str] = {}

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if self.training_bar is None or not logs:
                return
            latest = {k: f"{logs[k]:.4g}" for k in ("loss", "eval_loss") if isinstance(logs.get(k), float)}
            if latest:
                self.shown = {**self.shown, **latest}
                self.training_bar.set_postfix(self.shown)

    return LossProgressCallback()


def build_trainer(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    options: LoraOptions,
    *,
    eval_dataset: Any = None,
    work_dir: Path,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A TRL trainer over `model` wrapped in LoRA (not started)."""
    from trl import DPOTrainer, SFTTrainer

    peft_model = wrap_lora(model, options)
    if options.gradient_checkpointing:
        enable_gradient_checkpointing(peft_model, options.checkpoint_fraction)
    args = trainer_args(options, work_dir, has_eval=eval_dataset is not None)
    cls = DPOTrainer if options.method == "dpo" else SFTTrainer
    trainer = cls(
        model=peft_model,
        args=args,
        train_dataset=_as_dataset(dataset),
        eval_dataset=_as_dataset(eval_dataset),
        processing_class=tokenizer if tokenizer is not None else placeholder_tokenizer(peft_model),
        callbacks=list(callbacks),
    )
    from transformers.trainer_callback import ProgressCallback

    if trainer.pop_callback(ProgressCallback) is not None:  # present unless tqdm is disabled
        trainer.add_callback(loss_progress_callback())
    return trainer


def train_model(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    options: LoraOptions,
    *,
    callbacks: Sequence[Any] = (),
    eval_dataset: Any = None,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Train a LoRA adapter on `model` (in memory); return the training summary (JSON-ready)."""
    import torch

    with tempfile.TemporaryDirectory(prefix="lora-train-") as scratch:
        trainer = build_trainer(
            model,
            tokenizer,
            dataset,
            options,
            eval_dataset=eval_dataset,
            work_dir=Path(work_dir or scratch),
            callbacks=callbacks,
        )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        output = trainer.train()
        wall = time.perf_counter() - start
    trainer.model.eval()
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    return {
        "steps": int(trainer.state.global_step),
        "wall_time_s": round(wall, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
        "peak_memory": _peak_memory(),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "gradient_checkpointing": bool(options.gradient_checkpointing),
        "metrics": {k: v for k, v in output.metrics.items() if isinstance(v, int | float)},
        "log_history": list(trainer.state.log_history),
    }


def loss_curves(history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Train and eval loss per step from a Trainer log history."""
    train = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h and "step" in h]
    evals = [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h]
    return {"train": train, "eval": evals}


def plot_loss(curves: dict[str, list[dict[str, float]]], path: Path, title: str = "") -> None:
    """Write the loss curve(s) as a PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, points in curves.items():
        if points:
            marker = "o" if name == "eval" else None
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], label=name, marker=marker)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
