"""Running one benchmark case and the arithmetic of its report (tokens/s, memory, MFU).

``run_case(case, device, warmup, steps)`` builds a fresh model for the case, sets the recipe up,
runs ``warmup`` optimizer steps, then ``steps`` timed ones (the device synchronised after each),
and returns one result record. Peak memory is counted from just after the model is built (the
model's own weights are in it), over the recipe's setup, warm-up and timed steps.

MFU follows the usual convention: ``6 * N * tokens_per_s / peak``, N the model's parameter count
(all of them; the 6 is 2 forward + 4 backward FLOPs per parameter and token of full training), peak
the H200's dense bf16 rate from the datasheet, 989 TFLOP/s. LoRA does less than that (no weight
gradients for frozen weights), and checkpointing more (a second forward), so ``hfu`` counts the
FLOPs the step really executes: forward 2·M, backward 2·M (input gradients only), recompute 2·M of
the checkpointed layers, causal attention, and the adapter's 6·P (M: parameters in matrix
products, P: adapter parameters).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from adapters.bench.model import arch_dims, lora_param_count, param_counts
from adapters.bench.recipes import TARGETS, Case, Stepper, count_layer_calls

H200_BF16_DENSE_FLOPS = 989e12
GIB = 1024**3


def model_flops_per_token(dims: dict[str, Any]) -> float:
    """6·N: the FLOPs per token of the MFU convention."""
    return 6.0 * param_counts(dims)["total"]


def executed_flops_per_token(dims: dict[str, Any], case: Case) -> float:
    """FLOPs per token a LoRA step executes (see the module docstring)."""
    counts = param_counts(dims)
    layers = dims["num_hidden_layers"]
    per_layer_mm = counts["linear_per_layer"]
    matmul = layers * per_layer_mm + counts["lm_head"]
    q_dim = dims["num_attention_heads"] * dims["head_dim"]
    # QK^T and AV: 2·2·seq·q_dim per token per layer, halved by the causal mask.
    attn_fwd = layers * 2 * case.seq * q_dim
    ckpt_layers = round(case.checkpointing * layers)
    recompute = ckpt_layers * (2 * per_layer_mm + 2 * case.seq * q_dim)
    adapter = 6 * lora_param_count(dims, TARGETS[case.targets], 16)
    return 2 * matmul + attn_fwd + 2 * matmul + 2 * attn_fwd + recompute + adapter


def utilisation(flops_per_token: float, tokens_per_s: float, peak: float = H200_BF16_DENSE_FLOPS) -> float:
    return flops_per_token * tokens_per_s / peak


def synthetic_batches(vocab: int, micro_batch: int, seq: int, device: str, count: int = 3) -> list[Any]:
    """``count`` different batches of random token ids (never zeros), on ``device``."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (micro_batch, seq), generator=gen).to(device) for _ in range(count)]


def build_model(case: Case, device: str) -> Any:
    from adapters.bench.model import build_4bit_model, build_bf16_model, llama_config

    config = llama_config(case.arch, case.num_layers)
    if case.method == "qlora":
        return build_4bit_model(config, device)
    return build_bf16_model(config, device)


class _Memory:
    """CUDA memory counters; zeros (and ``available`` False) on other devices."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.torch = torch

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, float | None]:
        if not self.cuda:
            return {"allocated_gib": None, "peak_allocated_gib": None, "peak_reserved_gib": None}
        c = self.torch.cuda
        return {
            "allocated_gib": c.memory_allocated() / GIB,
            "peak_allocated_gib": c.max_memory_allocated() / GIB,
            "peak_reserved_gib": c.max_memory_reserved() / GIB,
        }


def timed_steps(
    stepper: Stepper, batches: list[Any], warmup: int, steps: int, sync: Callable[[], None]
) -> dict:
    """Run warm-up then timed steps; step times in seconds, the device synchronised after each."""
    calls = count_layer_calls(stepper.model)
    losses = []
    for i in range(warmup):
        losses.append(float(stepper.step(batches[i % len(batches)])))
    sync()
    calls[0] = 0
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = stepper.step(batches[(warmup + i) % len(batches)])
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"step_s": times, "losses": losses, "layer_calls": calls[0]}


def run_case(case: Case, device: str, warmup: int, steps: int) -> dict[str, Any]:
    """Measure one case; failures (out of memory included) become a record with ``status``."""
    import torch

    from adapters.bench import recipes

    dims = arch_dims(case.arch, case.num_layers)
    record: dict[str, Any] = {"name": case.name, **_case_fields(case), "warmup": warmup, "steps": steps}
    record["params"] = param_counts(dims)["total"]
    tokens_per_step = case.micro_batch * case.seq
    record["tokens_per_step"] = tokens_per_step
    if case.recipe == "ours":
        from adapters.bench.ours import unavailable

        reason = unavailable()
        if reason:
            return {**record, "status": "unavailable", "error": reason}
    mem = _Memory(device)
    mem.reset()
    model = stepper = None
    try:
        t0 = time.perf_counter()
        model = build_model(case, device)
        mem.sync()
        record["build_s"] = time.perf_counter() - t0
        record["build_peak_allocated_gib"] = mem.read()["peak_allocated_gib"]
        mem.reset()
        record["model_allocated_gib"] = mem.read()["allocated_gib"]
        batches = synthetic_batches(dims["vocab_size"], case.micro_batch, case.seq, device)
        if case.recipe == "ours":
            from adapters.bench.ours import run_ours

            timing, notes, trainable = run_ours(model, case, batches, warmup, steps, mem.sync)
        else:
            stepper = getattr(recipes, case.recipe)(model, case)
            timing = timed_steps(stepper, batches, warmup, steps, mem.sync)
            notes, trainable = stepper.notes, stepper.trainable_params
        record.update(_summary(timing, tokens_per_step, dims, case))
        record["trainable_params"] = trainable
        record["notes"] = notes
        record["status"] = "ok"
    except torch.OutOfMemoryError as exc:
        record["status"] = "oom"
        record["error"] = str(exc).splitlines()[0][:300]
    except Exception as exc:  # noqa: BLE001 - one broken case must not end the suite
        record["status"] = "error"
        record["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    finally:
        record.update({k: v for k, v in mem.read().items() if k != "allocated_gib"})
        del model, stepper
        gc.collect()
        mem.reset()
    return record


def _case_fields(case: Case) -> dict[str, Any]:
    return {
        "arch": case.arch,
        "method": case.method,
        "recipe": case.recipe,
        "targets": case.targets,
        "seq": case.seq,
        "micro_batch": case.micro_batch,
        "checkpointing": case.checkpointing,
        "num_layers": case.num_layers,
        "liger": case.liger,
    }


def _summary(timing: dict, tokens_per_step: int, dims: dict[str, Any], case: Case) -> dict[str, Any]:
    times = timing["step_s"]
    tokens_per_s = tokens_per_step * len(times) / sum(times)
    layers = dims["num_hidden_layers"]
    per_step = timing["layer_calls"] / len(times)
    ckpt_layers = round(case.checkpointing * layers)
    return {
        "tokens_per_s": tokens_per_s,
        "step_s_median": statistics.median(times),
        "step_s": times,
        "losses": timing["losses"],
        "mfu": utilisation(model_flops_per_token(dims), tokens_per_s),
        "hfu": utilisation(executed_flops_per_token(dims, case), tokens_per_s),
        "layer_calls_per_step": per_step,
        # Each checkpointed layer runs forward twice a step (forward, then recompute in backward).
        "checkpointing_active": per_step == layers + ckpt_layers if ckpt_layers else per_step == layers,
    }
