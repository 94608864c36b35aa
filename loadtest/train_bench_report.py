"""Alias: ``python -m loadtest.train_bench_report FILES`` still prints the training benchmark's tables;
use ``lora-gateway train-bench report FILES`` (``adapters/bench/report.py``)."""

if __name__ == "__main__":
    import sys

    from adapters.bench.report import main

    sys.exit(main())
