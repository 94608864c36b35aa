"""Micro-benchmark: the grouped LoRA ops against vLLM's own CPU ops, on one linear layer, no model.

    python -m engine_plugin.bench                     # the embedded tiny Llama's qkv and an 8B-sized one
    python -m engine_plugin.bench --json out.json
    python -m engine_plugin.bench --dtype bfloat16    # the dtype vLLM runs the embedded model in on the CPU

For each shape (hidden in, slices out, rank) and batch (decode: T rows of single tokens over A adapters,
interleaved, a quarter of them base-model rows; prefill: one prompt), the time of one `add_lora_linear`
through vLLM's `PunicaWrapperCPU` (its ops as shipped, wrong on base-model rows) and through
`GroupedPunicaWrapperCPU`, median of repeated calls, on this machine's torch threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from engine_plugin import lora_ops

SHAPES = {
    "tiny qkv (256 -> 3x256, r8)": (256, (256, 256, 256), 8),
    "tiny down (512 -> 256, r8)": (512, (256,), 8),
    "8B qkv (4096 -> 4096+1024+1024, r16)": (4096, (4096, 1024, 1024), 16),
    "8B gate_up (4096 -> 2x14336, r16)": (4096, (14336, 14336), 16),
}
BATCHES = {"decode 1": (1, 1, False), "decode 16 / 4 adapters": (16, 4, False),
           "decode 64 / 4 adapters": (64, 4, False), "decode 32 / 32 adapters": (32, 32, False),
           "prefill 512 / 1 adapter": (512, 1, True)}  # fmt: skip


def _wrappers(rows: int, adapters: int, prefill: bool) -> tuple[Any, Any]:
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from engine_plugin.punica import GroupedPunicaWrapperCPU

    ids = list(range(1, adapters + 1))
    if prefill:
        tokens = tuple([ids[0]] * rows)
        prompts: tuple[int, ...] = (ids[0],)
    else:
        tokens = tuple(0 if i % 4 == 3 else ids[i % adapters] for i in range(rows))
        prompts = tokens
    out = []
    for cls in (PunicaWrapperCPU, GroupedPunicaWrapperCPU):
        w = cls(max(rows, 8), max(rows, 8), "cpu")
        w.update_metadata(LoRAMapping(tokens, prompts, prefill), [*ids, None], adapters + 1, 32000)
        out.append(w)
    return out[0], out[1]


def _time(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(repeats: int = 30, dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    results = []
    for shape, (hidden, outs, rank) in SHAPES.items():
        for batch, (rows, adapters, prefill) in BATCHES.items():
            if hidden > 1024 and rows > 64:
                continue  # keeps the run short on 2 cores
            g = torch.Generator().manual_seed(0)
            a = tuple(torch.randn(adapters + 1, 1, rank, hidden, generator=g) * 0.01 for _ in outs)
            b = tuple(torch.randn(adapters + 1, 1, o, rank, generator=g) * 0.01 for o in outs)
            a = tuple(t.to(dtype) for t in a)
            b = tuple(t.to(dtype) for t in b)
            x = torch.randn(rows, hidden, generator=g).to(dtype)
            ref, ours = _wrappers(rows, adapters, prefill)
            y = torch.zeros(rows, sum(outs), dtype=dtype)
            t_ref = _time(lambda: ref.add_lora_linear(y, x, a, b, 1.0, outs), repeats)  # noqa: B023
            t_ours = _time(lambda: ours.add_lora_linear(y, x, a, b, 1.0, outs), repeats)  # noqa: B023
            row = {"shape": shape, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                   "vllm_ms": t_ref * 1e3, "grouped_ms": t_ours * 1e3, "speedup": t_ref / t_ours}  # fmt: skip
            ms = f"vLLM {row['vllm_ms']:8.3f} ms  grouped {row['grouped_ms']:8.3f} ms"
            print(f"{shape:40s} {batch:24s} {ms}  {row['speedup']:6.1f}x", flush=True)
            results.append(row)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="Also write the results here.")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32",
        help="The stacks' and activations' dtype (vLLM runs the embedded model in bfloat16 on the CPU).",
    )  # fmt: skip
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    results = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "native_half_matmul": lora_ops.fast_half_matmul(dtype), "results": run(args.repeats, dtype),
    }  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
