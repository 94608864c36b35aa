"""vLLM's two adapter limits when `engine.max_loras` / `engine.max_cpu_loras` are unset: sized from memory.

    adapter    = a LoRA of rank engine.max_lora_rank on all 7 linear layers of every decoder layer, in the
                 base model's dtype (its config.json): the largest adapter the engine accepts
    max_loras  = engine.lora_slots_memory_mib // adapter, within [1, MAX_AUTO_LORAS]
    cpu_loras  = engine.lora_cache_memory x host memory // adapter, within [max_loras, MAX_AUTO_CPU_LORAS]

`--max-loras` is the number of adapters in one batch. vLLM preallocates a slot for each, at the full rank, on
the device (on a GPU, memory taken from the KV cache), and its scheduler holds back a request whose adapter
finds no slot: with many clients on distinct adapters, that is the limit on the batch. `--max-cpu-loras` is
its LRU cache of adapters in host memory: one it evicts is read back from disk inside its step loop when a
batch needs it, and one the gateway must unload (above `registry.max_resident`) is a load through vLLM's API.

Adapters are small next to memory: 0.53 MiB for the embedded tiny base at rank 16, 80 MiB for Llama 3 8B at
rank 16 in bfloat16, 395 MiB for a 70B. The fixed defaults they replace (2 slots, 4 in memory) left almost all
of it unused while a thousand adapters fit: 2 GiB of slots is 32 of the first (the cap), 25 of the second, 5
of the third; 10% of a 24 GiB machine holds 4,096 of the first (the cap), 30 of the second.

"Host memory" is the smaller of the machine's and the cgroup's limit (a container's `resources.limits`).
Without the base model's config.json (an HF id not in the cache yet): FALLBACK_LORAS and FALLBACK_CPU_LORAS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MAX_AUTO_LORAS = 32  # vLLM's per-step LoRA bookkeeping grows with the slots; 32 covers 32 distinct adapters
MAX_AUTO_CPU_LORAS = 4096  # above this, vLLM's /v1/models listing (read at every probe) gets long
FALLBACK_LORAS = 4  # the base model's shapes are unknown
FALLBACK_CPU_LORAS = 64
CGROUP_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


@dataclass(frozen=True)
class LoraSizing:
    """The numbers chosen, and how (the start-up log line)."""

    max_loras: int
    cpu_loras: int
    how: str

    def engine_fields(self) -> dict[str, int]:
        """As `EngineSettings` fields: what a managed vLLM is started with, and what its workers count."""
        return {"max_loras": self.max_loras, "max_cpu_loras": self.cpu_loras}


def host_memory_bytes(cgroup_files: tuple[str, ...] = CGROUP_FILES) -> int:
    """Physical memory, or the cgroup's limit if lower (cgroup v2, then v1; "max" = no limit)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for name in cgroup_files:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def size_loras(
    adapter_bytes: int | None,
    *,
    rank: int,
    slots_bytes: int,
    cache_fraction: float,
    max_loras: int | None = None,
    cpu_loras: int | None = None,
    memory_bytes: int | None = None,
) -> LoraSizing:
    """The unset ones of `max_loras` and `cpu_loras` from memory; a set one is kept as it is."""
    parts: list[str] = []
    if max_loras is None:
        if adapter_bytes:
            max_loras = max(1, min(MAX_AUTO_LORAS, slots_bytes // adapter_bytes))
            slots_mib = slots_bytes / 2**20
            parts.append(f"--max-loras {max_loras}: {slots_mib:.0f} MiB of slots (at most {MAX_AUTO_LORAS})")
        else:
            max_loras = FALLBACK_LORAS
            parts.append(f"--max-loras {max_loras}")
        if cpu_loras is not None:
            max_loras = min(max_loras, cpu_loras)  # vLLM refuses more in a batch than in memory
    if cpu_loras is None:
        if adapter_bytes:
            memory = host_memory_bytes() if memory_bytes is None else memory_bytes
            fits = int(memory * cache_fraction) // adapter_bytes
            cpu_loras = max(max_loras, min(MAX_AUTO_CPU_LORAS, fits))
            parts.append(
                f"--max-cpu-loras {cpu_loras}: {cache_fraction:.0%} of {memory / 2**30:.1f} GiB host memory "
                f"(at most {MAX_AUTO_CPU_LORAS})"
            )
        else:
            cpu_loras = max(FALLBACK_CPU_LORAS, max_loras)
            parts.append(f"--max-cpu-loras {cpu_loras}")
    if not parts:
        how = "set in engine.*"
    elif adapter_bytes:
        how = "; ".join(parts) + f", over {adapter_bytes / 2**20:.2f} MiB an adapter at rank {rank}"
    else:
        how = "; ".join(parts) + " (the base model's config.json could not be read)"
    return LoraSizing(max_loras, cpu_loras, how)
