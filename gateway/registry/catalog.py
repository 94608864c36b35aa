"""What a `model` string resolves to: the base model, or one adapter version.

`Registry.resolve("sql")` (`gateway/registry/service.py`) answers a `Target`: what a request should run
on, with the name vLLM knows the adapter by and the folder vLLM loads it from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AdapterRef:
    """One adapter version as the engine sees it."""

    name: str  # the name users call
    engine_name: str  # the `lora_name` given to vLLM (unique per version)
    path: Path  # absolute folder vLLM loads from
    version: int = 1
    pinned: bool = False
    created: int = 0


@dataclass(frozen=True)
class Target:
    """What one request runs on. `adapter` is None for the base model."""

    requested: str
    engine_model: str
    adapter: AdapterRef | None = None
    canary: bool = False  # the version was picked by a weighted split (gateway/registry/split.py)

    @property
    def label(self) -> str:
        """The metric label for this target: a registered name, never free text from a request."""
        return self.adapter.name if self.adapter else self.engine_model
