"""``python -m adapters.bench ...``: ``lora-gateway train-bench ...`` without the installed CLI."""

import sys

from adapters.bench.cli import main

sys.exit(main())
