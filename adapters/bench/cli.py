"""``lora-gateway train-bench ...`` (the same as ``python -m adapters.bench ...``): run the training
benchmark, or print the tables of its results with ``report``.

    lora-gateway train-bench --arch llama3-8b --method lora --recipe baseline,ours --out results.json
    lora-gateway train-bench --suite h200 --out results.json --time-budget 480
    lora-gateway train-bench report docs/training-benchmarks/*.json
    lora-gateway train-bench --help          # every option (adapters/bench/run.py)

Plain ``argparse`` behind one pass-through typer command (``adapters/cli.py``), as ``lora-gateway train``:
``python -m adapters.bench`` works where the package is not installed (a copy of the tree on a GPU box).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["report"]:
        from adapters.bench.report import main as report

        return report(args[1:])
    from adapters.bench.run import main as run

    return run(args)
