"""Markdown tables from training-benchmark results: tokens/s, MFU, peak memory, which cards it fits.

    lora-gateway train-bench report docs/training-benchmarks/*.json

A configuration *fits* a card of C GB when its peak reserved memory plus ``CONTEXT_GIB`` (the CUDA
context and library workspaces, which PyTorch's allocator does not count) is at most C GiB (cards
sold as 24/40/48/80 GB hold about that many GiB: an RTX 4090 24,564 MiB, an A100 40,960 or 81,920
MiB, an RTX 6000 Ada 49,140 MiB). ``~`` marks a configuration whose peak allocated memory fits but
whose reserved memory does not: it fits with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``
or a smaller allocator cache, not as measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CARDS_GB = (24, 40, 48, 80)
CONTEXT_GIB = 1.0


def fits(record: dict[str, Any], card_gb: int) -> str:
    reserved, allocated = record.get("peak_reserved_gib"), record.get("peak_allocated_gib")
    if reserved is None or allocated is None:
        return "?"
    if reserved + CONTEXT_GIB <= card_gb:
        return "yes"
    if allocated + CONTEXT_GIB <= card_gb:
        return "~"
    return "no"


def setup_name(r: dict[str, Any]) -> str:
    model = {"llama3-8b": "8B", "llama3-70b": "70B"}.get(r["arch"], r["arch"])
    method = "LoRA bf16" if r["method"] == "lora" else "QLoRA NF4"
    targets = " q,v" if r["targets"] == "qv" else ""
    ckpt = r["checkpointing"]
    ckpt_s = "ckpt" if ckpt == 1.0 else ("no ckpt" if ckpt == 0.0 else f"ckpt {ckpt:.0%} of layers")
    recipe = r["recipe"] + ("+liger" if r.get("liger") else "")
    return f"{model} {method}{targets}, {ckpt_s}, {recipe}"


def table(records: list[dict[str, Any]]) -> str:
    head = ["setup", "seq", "mb", "tokens/s", "MFU", "peak alloc GiB", "peak reserved GiB"]
    head += [f"{c} GB" for c in CARDS_GB]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r.get("status") != "ok":
            cells = [r["name"], "", "", r.get("status", "?"), "", "", ""] + [""] * len(CARDS_GB)
        else:
            cells = [
                setup_name(r),
                str(r["seq"]),
                str(r["micro_batch"]),
                f"{r['tokens_per_s']:,.0f}",
                f"{r['mfu']:.1%}",
                _gib(r.get("peak_allocated_gib")),
                _gib(r.get("peak_reserved_gib")),
            ] + [fits(r, c) for c in CARDS_GB]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def load(paths: list[Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in paths:
        out.extend(json.loads(path.read_text())["results"])
    return out


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: lora-gateway train-bench report RESULTS.json ...", file=sys.stderr)
        return 2
    print(table(load(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
