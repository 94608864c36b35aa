"""The training recipes the benchmark compares, each a function ``(model, case) -> Trainer step``.

- ``baseline``: the textbook PEFT recipe, as blog posts and the PEFT docs give it, and as the
  issue's reference numbers were taken: ``prepare_model_for_kbit_training`` for QLoRA (which
  casts every non-4-bit weight to fp32), ``gradient_checkpointing_enable()`` +
  ``enable_input_require_grads()``, ``LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05)``,
  ``get_peft_model`` (adapter weights in fp32), ``model.train()``, ``torch.optim.AdamW`` over the
  trainable parameters, and ``model(input_ids, labels=input_ids).loss`` (full logits, upcast to
  fp32 by transformers' loss).
- ``levers``: the same model and adapter with the changes the benchmark measures for our train
  path: bf16 autocast over fp32 adapter weights, no adapter dropout, no fp32 upcast of the 4-bit
  model's other weights, non-reentrant checkpointing of all or some decoder layers, and the loss
  through ``chunked_lm_loss`` (no full fp32 logits); with ``liger``, Liger's fused RMSNorm,
  SwiGLU and RoPE kernels (Triton; GPU only). It is a reference loop: what
  ``adapters/train.py`` should do, measured.
- ``ours``: ``adapters.train`` itself, through ``adapters/bench/ours.py``.

Every recipe returns a ``Stepper``: ``step(batch) -> loss`` runs one optimizer step. Checkpointing
is verified, not assumed: ``count_layer_calls`` counts decoder-layer forwards, which run twice
per step (forward and recompute) in every checkpointed layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from adapters.bench.loss import chunked_lm_loss
from adapters.llama import LINEAR_MODULES

TARGETS = {"all-linear": LINEAR_MODULES, "qv": ("q_proj", "v_proj")}
LORA_RANK = 16
LORA_ALPHA = 32
LR = 2e-4


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration."""

    arch: str
    method: str  # "lora" (bf16 base) or "qlora" (NF4 base)
    recipe: str  # "baseline", "levers", "ours"
    seq: int
    micro_batch: int
    checkpointing: float  # fraction of decoder layers checkpointed: 1.0 all, 0.0 none
    targets: str = "all-linear"  # "all-linear" or "qv"
    num_layers: int | None = None  # fewer decoder layers than the architecture (extrapolated runs)
    liger: bool = False  # levers and ours: Liger's fused RMSNorm, SwiGLU and RoPE kernels

    def __post_init__(self) -> None:
        if self.method not in ("lora", "qlora"):
            raise ValueError(f"method: 'lora' or 'qlora', got {self.method!r}")
        if self.recipe not in ("baseline", "levers", "ours"):
            raise ValueError(f"recipe: 'baseline', 'levers' or 'ours', got {self.recipe!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets: one of {sorted(TARGETS)}, got {self.targets!r}")
        if not 0.0 <= self.checkpointing <= 1.0:
            raise ValueError(f"checkpointing: a fraction in [0, 1], got {self.checkpointing}")
        if self.recipe == "baseline" and self.checkpointing not in (0.0, 1.0):
            raise ValueError("checkpointing: the baseline checkpoints all layers or none")
        if self.liger and self.recipe == "baseline":
            raise ValueError("liger: the textbook baseline takes no Liger kernels")
        if self.seq < 2 or self.micro_batch < 1:
            raise ValueError(f"seq >= 2 and micro_batch >= 1 needed, got {self.seq}, {self.micro_batch}")

    @property
    def name(self) -> str:
        layers = f"-L{self.num_layers}" if self.num_layers else ""
        ckpt = {1.0: "ckpt", 0.0: "nockpt"}.get(self.checkpointing, f"ckpt{self.checkpointing:g}")
        liger = "-liger" if self.liger else ""
        return (
            f"{self.arch}{layers}-{self.method}-{self.targets}-{self.recipe}{liger}"
            f"-s{self.seq}-mb{self.micro_batch}-{ckpt}"
        )


@dataclasses.dataclass
class Stepper:
    """A model ready to train and the function that runs one optimizer step on a batch."""

    model: Any
    step: Callable[[Any], Any]
    trainable_params: int
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)


def count_layer_calls(model: Any) -> list[int]:
    """A one-element list counting forward calls of every decoder layer of ``model`` (hooks stay)."""
    counter = [0]

    def hook(_module: Any, _args: Any) -> None:
        counter[0] += 1

    for layer in _decoder_layers(model):
        layer.register_forward_pre_hook(hook)
    return counter


def _decoder_layers(model: Any) -> Any:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers


def _lora_config(targets: str, dropout: float) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=dropout,
        target_modules="all-linear" if targets == "all-linear" else list(TARGETS[targets]),
        task_type="CAUSAL_LM",
    )


def _adamw(model: Any, fused: bool) -> Any:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LR, fused=fused and params[0].is_cuda)


def baseline(model: Any, case: Case) -> Stepper:
    """The textbook PEFT recipe (see the module docstring)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    ckpt = case.checkpointing == 1.0
    if case.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
    elif ckpt:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, _lora_config(case.targets, dropout=0.05))
    model.train()
    optimizer = _adamw(model, fused=False)

    def step(batch: Any) -> Any:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Stepper(
        model, step, _trainable(model), {"lora_dropout": 0.05, "loss": "transformers (fp32 logits)"}
    )


def set_checkpointing(model: Any, fraction: float) -> int:
    """Checkpoint the first ``round(fraction * L)`` decoder layers (non-reentrant); returns how many."""
    layers = _decoder_layers(model)
    n = round(fraction * len(layers))
    if n == 0:
        return 0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n
    return n


def levers(model: Any, case: Case) -> Stepper:
    """The reference loop with the levers (see the module docstring)."""
    import torch
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    if case.liger:
        # Patches this model's norms and MLPs, and transformers' Llama RoPE function for the process.
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=True,
            rms_norm=True,
            swiglu=True,
            cross_entropy=False,
            fused_linear_cross_entropy=False,
            model=model,
        )
    n_ckpt = set_checkpointing(model, case.checkpointing)
    model = get_peft_model(model, _lora_config(case.targets, dropout=0.0))
    model.train()
    optimizer = _adamw(model, fused=True)
    causal_lm = model.get_base_model()
    device_type = next(model.parameters()).device.type

    def step(batch: Any) -> Any:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            hidden = causal_lm.model(input_ids=batch).last_hidden_state
        loss = chunked_lm_loss(hidden[:, :-1], causal_lm.lm_head.weight, batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    notes = {
        "lora_dropout": 0.0,
        "loss": "chunked (no full logits)",
        "checkpointed_layers": n_ckpt,
        "liger": case.liger,
    }
    return Stepper(model, step, _trainable(model), notes)


def _trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
