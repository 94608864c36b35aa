"""Which adapters are loaded in which engine: the only code that calls vLLM's load/unload routes."""

from __future__ import annotations

from gateway.residency.leases import Lease, Residency

__all__ = ["Lease", "Residency"]
