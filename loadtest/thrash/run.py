"""What the thrash scenarios add to compare's run.

    thrash         the LoRA vLLM behind a gateway keeping only ``thrash_resident`` adapters loaded
                   (``registry.max_resident``), under the same mix as adapter-N: the gateway hot-loads
                   and evicts through vLLM's load/unload routes
    engine-thrash  a vLLM of its own keeping only ``thrash_resident`` adapters, in its batch slots
                   (``--max-loras``) and in memory (``--max-cpu-loras``), behind a gateway that registers
                   all N: vLLM swaps adapters through its slots and reads the ones it evicted back from
                   disk itself, inside its step loop; the gateway loads each once

The thrash gateway and the all-resident one take turns over the same vLLM (:class:`GatewaySlot`), so the
two modes of a level share the engine and the moment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtest.harness.scenario import require_registered, unload_all
from loadtest.servers.processes import Server, gateway_process

Log = Callable[[str], None]


class GatewaySlot:
    """One gateway at a time over one vLLM, of the kinds in ``resident`` (kind -> how many adapters it
    keeps loaded; compare's ``all`` keeps every adapter, ``thrash`` fewer). Switching stops the current
    one and unloads vLLM's adapters, so the next gateway starts from an empty engine; ``warmed`` tells
    which modes still need a warm-up. ``settings(resident)`` is a gateway's configuration."""

    def __init__(
        self,
        vllm: Server,
        names: Sequence[str],
        resident: Mapping[str, int],
        settings: Callable[[int], dict[str, Any]],
        work: Path,
        log: Log,
    ) -> None:
        self.vllm, self.names, self.resident, self.settings = vllm, names, resident, settings
        self.work, self.log = work, log
        self.kind: str | None = None
        self.server: Server | None = None
        self.warmed: set[str] = set()
        self._stack = contextlib.ExitStack()
        self.starts = 0

    def use(self, kind: str) -> Server:
        if kind == self.kind and self.server is not None:
            return self.server
        self.close()
        unload_all(self.vllm.url)
        resident = self.resident[kind]
        self.starts += 1
        name = f"gateway-{kind}-{self.starts}"
        self.server = self._stack.enter_context(
            gateway_process(self.settings(resident), self.work, name=name)
        )
        require_registered(self.server, self.names)
        self.kind, self.warmed = kind, set()
        self.log(f"gateway with {resident} resident slot(s) at {self.server.url}")
        return self.server

    def close(self) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self.kind, self.server = None, None
