"""Alias: the training benchmark moved to ``adapters/bench`` (it measures ``adapters.train`` and needs
torch). ``python -m loadtest.train_bench ...`` still runs it; use ``lora-gateway train-bench ...``."""

if __name__ == "__main__":
    import sys

    from adapters.bench.run import main

    sys.exit(main())
