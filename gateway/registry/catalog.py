"""The seam between the API and wherever adapters are recorded: a catalog resolves a `model` string.

`resolve("sql")` answers what a request should run on: the base model, or one adapter version with the
name vLLM knows it by and the folder vLLM loads it from. `DirectoryCatalog` is the simplest catalog:
every PEFT folder inside one directory, named by its folder name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("lora_gateway.registry")


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

    @property
    def label(self) -> str:
        """The metric label for this target: a registered name, never free text from a request."""
        return self.adapter.name if self.adapter else self.engine_model


class AdapterCatalog(Protocol):
    base_name: str

    def resolve(self, model: str) -> Target | None: ...

    def adapters(self) -> list[AdapterRef]:
        """Every adapter users can call (one entry per callable name)."""
        ...

    def known_labels(self) -> set[str]: ...


class DirectoryCatalog:
    """Adapters = the PEFT folders (`adapter_config.json` inside) directly under `root`."""

    def __init__(self, root: Path, base_name: str) -> None:
        self.root = Path(root)
        self.base_name = base_name
        self._adapters: dict[str, AdapterRef] = {}
        self.refresh()

    def refresh(self) -> None:
        found: dict[str, AdapterRef] = {}
        if self.root.is_dir():
            for folder in sorted(self.root.iterdir()):
                if folder.name.startswith(".") or not (folder / "adapter_config.json").is_file():
                    continue
                if folder.name == self.base_name:
                    log.warning("skipping adapter %s: its name is the base model's", folder)
                    continue
                created = int(folder.stat().st_mtime)
                found[folder.name] = AdapterRef(folder.name, folder.name, folder.resolve(), created=created)
        elif self.root:
            log.warning("adapters directory %s does not exist; serving the base model only", self.root)
        self._adapters = found

    def resolve(self, model: str) -> Target | None:
        if model == self.base_name:
            return Target(model, self.base_name)
        ref = self._adapters.get(model)
        return Target(model, ref.engine_name, ref) if ref else None

    def adapters(self) -> list[AdapterRef]:
        return list(self._adapters.values())

    def known_labels(self) -> set[str]:
        return {self.base_name, *self._adapters}
