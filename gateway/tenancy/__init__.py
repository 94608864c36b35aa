"""Many teams on one deployment: API keys managed at runtime (`keys.py`), per-key limits (`limits.py`),
usage accounting (`usage.py`) and the access log (`access.py`)."""
