"""GPU training benchmark: Llama-3-8B/70B shapes, LoRA and QLoRA, textbook recipe vs our train path.

Builds the model from its config with random weights directly on the GPU (nothing downloaded),
trains on synthetic token batches, and reports peak memory (``max_memory_allocated`` and
``max_memory_reserved``), tokens/s, MFU and whether gradient checkpointing really ran. Three
recipes (``adapters/bench/recipes.py``): ``baseline`` (the textbook PEFT recipe), ``ours``
(``adapters.train``, the code of ``lora-gateway train``) and ``levers`` (a reference loop with the
speed and memory changes, measured for ``adapters/train.py`` to adopt).

One configuration:

    lora-gateway train-bench --arch llama3-8b --method lora --recipe baseline,ours \\
        --seq 2048 --micro-batch 4 --checkpointing --steps 4 --out results.json

The planned list (``SUITES`` below), cut short once ``--time-budget`` seconds have passed:

    lora-gateway train-bench --suite h200 --out results.json --time-budget 480
    lora-gateway train-bench --suite h200 --select qlora --out results.json
    lora-gateway train-bench --suite h200 --skip ours,70b --out results.json

CPU check of the whole path on a tiny model (seconds):

    lora-gateway train-bench --arch tiny --device cpu --method lora --recipe baseline,levers \\
        --seq 64 --micro-batch 2 --steps 2 --out /tmp/bench.json

Results accumulate in ``--out`` (a JSON document rewritten after every case, so a run that is cut
off keeps what it measured); one line per case is printed as it finishes. docs/training-benchmarks.md
holds the table made from these files on an H200 (``lora-gateway train-bench report``).
``python -m adapters.bench`` is the same command without the installed CLI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from adapters.bench.recipes import Case

B, L, OURS = "baseline", "levers", "ours"


def _c(recipe: str, method: str, seq: int, mb: int, ckpt: float = 1.0, **kw: Any) -> Case:
    return Case(kw.pop("arch", "llama3-8b"), method, recipe, seq, mb, ckpt, **kw)


#: Planned runs, most important first (a time budget cuts the tail). The issue's target table
#: first, each baseline case next to ours and the levers at the same micro-batch.
SUITES: dict[str, list[Case]] = {
    "h200": [
        *[_c(r, "lora", 2048, 1) for r in (B, OURS, L)],
        *[_c(r, "lora", 2048, 4) for r in (B, OURS, L)],
        *[_c(r, "qlora", 2048, 1) for r in (B, OURS, L)],
        *[_c(r, "qlora", 2048, 4) for r in (B, OURS, L)],
        _c(L, "qlora", 2048, 1, arch="llama3-70b"),
        _c(OURS, "qlora", 2048, 1, arch="llama3-70b"),
        _c(L, "lora", 2048, 4, 0.75),
        *[_c(r, "lora", 2048, 8) for r in (B, OURS, L)],
        _c(L, "lora", 2048, 8, 0.75),
        *[_c(r, "lora", 2048, 1, 0.0) for r in (B, OURS, L)],
        *[_c(r, "lora", 2048, 4, targets="qv") for r in (B, OURS, L)],
        *[_c(r, "lora", 4096, 2) for r in (B, OURS, L)],
        *[_c(r, "qlora", 4096, 2) for r in (B, OURS, L)],
        _c(L, "qlora", 2048, 8),
        _c(L, "lora", 2048, 16),
        *[_c(r, "lora", 512, 16) for r in (B, L)],
        _c(L, "lora", 2048, 4, 0.5),
        _c(L, "qlora", 2048, 4, arch="llama3-70b"),
        _c(B, "qlora", 2048, 1, arch="llama3-70b"),
    ],
    # Second H200 call: the levers without checkpointing at larger micro-batches, and Liger's kernels.
    "h200-more": [
        _c(L, "lora", 2048, 1),
        *[_c(r, "lora", 2048, 2, 0.0) for r in (B, L)],
        *[_c(r, "lora", 2048, 2) for r in (B, L)],
        *[_c(r, "lora", 2048, 4, 0.0) for r in (B, L)],
        _c(L, "lora", 2048, 1, liger=True),
        _c(L, "lora", 2048, 4, liger=True),
        _c(L, "lora", 2048, 4, 0.75, liger=True),
        _c(L, "lora", 2048, 1, 0.0, liger=True),
        _c(L, "lora", 2048, 2, 0.0, liger=True),
        _c(L, "lora", 2048, 4, 0.0, liger=True),
        _c(L, "lora", 2048, 8, liger=True),
        _c(L, "qlora", 2048, 4, liger=True),
        _c(L, "qlora", 2048, 1, arch="llama3-70b", liger=True),
    ],
    # Our train path next to the baseline and the best levers, in one call.
    "h200-ours": [
        # Call 1: 8B LoRA. The textbook baseline next to our train path, plain and with the levers.
        _c(B, "lora", 2048, 4),
        _c(OURS, "lora", 2048, 4),
        _c(OURS, "lora", 2048, 4, 0.75, liger=True),
        _c(OURS, "lora", 2048, 1, 0.0, liger=True),
        _c(B, "lora", 2048, 1, 0.0),
        _c(OURS, "lora", 2048, 2, 0.0, liger=True),
        _c(OURS, "lora", 2048, 1),
        _c(B, "lora", 2048, 1),
    ],
    "h200-ours-qlora": [
        # Call 2: 8B QLoRA next to the baseline, then 70B QLoRA (built layer by layer).
        _c(B, "qlora", 2048, 4),
        _c(OURS, "qlora", 2048, 4, liger=True),
        _c(OURS, "qlora", 2048, 1, liger=True),
        _c(B, "qlora", 2048, 1),
        _c(OURS, "qlora", 2048, 1, arch="llama3-70b", liger=True),
    ],
    "h200-ours-seqs": [
        # Call 4: our path (with Liger) at the other sequence lengths, micro-batch 1, checkpointing on/off.
        *[
            _c(OURS, m, seq, 1, ckpt, liger=True)
            for m in ("lora", "qlora")
            for seq in (512, 4096)
            for ckpt in (1.0, 0.0)
        ],
        _c(OURS, "lora", 512, 16, liger=True),
        _c(OURS, "qlora", 4096, 2, liger=True),
    ],
    "tiny": [Case("tiny", m, r, 64, 2, c) for m in ("lora", "qlora") for r in (B, L) for c in (1.0, 0.0)],
}


def environment(device: str) -> dict[str, Any]:
    """Date, machine, GPU, driver and library versions, for the report."""
    import torch

    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
    }
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "liger-kernel"):
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = props.total_memory / 1024**3
        env["gpu_count"] = torch.cuda.device_count()
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            env["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def load_report(path: Path) -> dict[str, Any]:
    """The report at ``path`` if there is one (results accumulate), else an empty one."""
    if path.exists():
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("results"), list):
            return data
    return {"environment": {}, "results": []}


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def summary_line(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r['name']:<58} {r.get('status')}: {r.get('error', '')[:120]}"
    peak = r.get("peak_allocated_gib")
    peak_s = f"{peak:6.1f} GiB" if peak is not None else "   n/a"
    return (
        f"{r['name']:<58} {r['tokens_per_s']:9.0f} tok/s  peak {peak_s}  mfu {r['mfu']:.1%}"
        f"  ckpt-calls {r['layer_calls_per_step']:.0f}{'' if r['checkpointing_active'] else ' (!)'}"
    )


def cases_from_args(args: argparse.Namespace) -> list[Case]:
    if args.suite:
        if args.suite not in SUITES:
            raise SystemExit(f"--suite: unknown suite {args.suite!r}; known: {', '.join(SUITES)}")
        cases = SUITES[args.suite]
        if args.select:
            cases = [c for c in cases if all(s in c.name for s in args.select.split("+"))]
        if args.skip:
            cases = [c for c in cases if not any(s in c.name for s in args.skip.split(","))]
        return cases
    fraction = args.checkpoint_fraction
    if fraction is None:
        fraction = 1.0 if args.checkpointing else 0.0
    return [
        Case(
            args.arch,
            args.method,
            recipe,
            args.seq,
            args.micro_batch,
            fraction,
            args.targets,
            args.num_layers,
            liger=args.liger and recipe != "baseline",  # the textbook baseline never takes them
        )
        for recipe in args.recipe.split(",")
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lora-gateway train-bench",
        description=__doc__.split("\n\n")[0],
        epilog="lora-gateway train-bench report RESULTS.json ... prints the tables of the results.",
    )
    p.add_argument("--arch", default="llama3-8b", help="llama3-8b, llama3-70b or tiny")
    p.add_argument("--method", default="lora", choices=["lora", "qlora"])
    p.add_argument("--recipe", default="baseline,ours", help="comma list of baseline, ours, levers")
    p.add_argument("--targets", default="all-linear", choices=["all-linear", "qv"])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--checkpoint-fraction", type=float, default=None, help="checkpoint this share of layers")
    p.add_argument("--num-layers", type=int, default=None, help="fewer decoder layers (extrapolation)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    p.add_argument("--liger", action="store_true", help="levers and ours: Liger's fused kernels")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--device", default="cuda")
    p.add_argument("--suite", default=None, help=f"run a planned list: {', '.join(SUITES)}")
    p.add_argument("--select", default=None, help="with --suite: cases whose name holds all of A+B+...")
    p.add_argument(
        "--skip", default=None, help="with --suite: leave out cases whose name holds any of A,B,..."
    )
    p.add_argument("--time-budget", type=float, default=None, help="start no case after this many seconds")
    p.add_argument("--out", type=Path, required=True, help="JSON report (results accumulate)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = cases_from_args(args)
    from adapters.bench.measure import run_case

    report = load_report(args.out)
    report["environment"] = environment(args.device)
    start = time.monotonic()
    print(f"{len(cases)} case(s); environment {json.dumps(report['environment'])}", flush=True)
    for case in cases:
        if args.time_budget is not None and time.monotonic() - start > args.time_budget:
            report["results"].append({"name": case.name, "status": "skipped", "error": "time budget spent"})
            print(f"{case.name:<58} skipped: time budget spent", flush=True)
            continue
        record = run_case(case, args.device, args.warmup, args.steps)
        report["results"].append(record)
        write_report(args.out, report)
        print(summary_line(record), flush=True)
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
