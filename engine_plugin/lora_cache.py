"""vLLM's adapter cache, looked up in O(1) per adapter per step (any platform).

vLLM 0.32's `LRUCacheWorkerLoRAManager.add_adapter` runs for every adapter of every engine step, and asks
`lora_request.lora_int_id not in self.list_adapters()`, which copies the whole cache (`--max-cpu-loras`
entries) into a dict and then a set first. With the cache sized to a thousand adapters and 32 adapters a
step, that copy was 9% of the worker's time (docs/benchmarks.md, "A thousand adapters"). The patch answers
the common case, an adapter already in the cache (not reloaded in place), as vLLM's own `else` branch does:
touch it in the LRU order and activate it. Everything else goes to vLLM's method unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

PATCHED = "_lora_gateway_fast_lookup"


def install() -> bool:
    """Patch vLLM's method once; False if its shape is not the one this was written for."""
    from vllm.lora import worker_manager

    cls = worker_manager.LRUCacheWorkerLoRAManager
    if getattr(cls.add_adapter, PATCHED, False):
        return True
    if not hasattr(worker_manager, "gpu_sync_allowed"):
        return False
    original = cls.add_adapter
    gpu_sync_allowed = worker_manager.gpu_sync_allowed

    @functools.wraps(original)
    def add_adapter(self: Any, lora_request: Any) -> bool:
        manager = self._adapter_manager
        if not getattr(lora_request, "load_inplace", False):
            with gpu_sync_allowed():
                if manager.get_adapter(lora_request.lora_int_id) is not None:  # cached: touched by get
                    manager.activate_adapter(lora_request.lora_int_id)
                    return True
        return original(self, lora_request)

    setattr(add_adapter, PATCHED, True)
    cls.add_adapter = add_adapter  # type: ignore[method-assign]
    return True
