"""What the scenarios that start their own vLLM and gateways share (compare, thrash, routing): the shape
of their configuration, their adapters (names, ranks, random ones for a base), a work folder holding
private copies of the base and the adapters, and what vLLM and a gateway hold of those adapters.

One measured level of such a scenario is ``loadtest.harness.level``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

from adapters.validate import VLLM_MAX_LORA_RANKS
from loadtest.servers.processes import Server


class ScenarioConfig(Protocol):
    """The fields compare's and routing's configurations have in common (frozen dataclasses)."""

    @property
    def base(self) -> Path: ...
    @property
    def adapters(self) -> Sequence[Path]: ...
    @property
    def snapshot_base(self) -> bool: ...
    @property
    def served_base(self) -> str: ...
    @property
    def mix(self) -> str: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def ignore_eos(self) -> bool: ...
    @property
    def seed(self) -> int: ...
    @property
    def timeout_s(self) -> float: ...
    @property
    def time_limit_s(self) -> float: ...
    @property
    def client(self) -> str: ...
    @property
    def verify(self) -> bool: ...


C = TypeVar("C", bound=ScenarioConfig)


def check_names(names: Sequence[str]) -> None:
    """Adapters are served under their folder names, so those must differ."""
    if len(set(names)) != len(names):
        raise ValueError(f"adapters: folder names must differ, got {list(names)}")


def check_concurrency(levels: Sequence[int]) -> None:
    if not levels or any(c < 1 for c in levels):
        raise ValueError(f"concurrency: must be >= 1, got {list(levels)}")


def config_dict(cfg: Any) -> dict[str, Any]:
    """A scenario's configuration for ``results.json``: paths as strings, tuples as lists."""
    d = dataclasses.asdict(cfg)
    for k in ("base", "out", "workdir"):
        d[k] = None if d[k] is None else str(d[k])
    d["adapters"] = [str(a) for a in cfg.adapters]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def lora_rank(adapter: Path) -> int:
    return int(json.loads((Path(adapter) / "adapter_config.json").read_text())["r"])


def max_lora_rank(adapters: Sequence[Path]) -> int:
    """The smallest rank vLLM accepts for ``--max-lora-rank`` that fits every adapter."""
    r = max(lora_rank(a) for a in adapters)
    return next(x for x in VLLM_MAX_LORA_RANKS if x >= r)


def random_adapters(base: Path, base_name: str, n: int, out: Path, *, rank: int = 8) -> list[Path]:
    """``n`` random LoRA adapters for ``base`` (``adapters/demo.py``), named ``rand-00``..; reused while
    the base's ``config.json`` is the same (a stamp in each folder says which one it was made for)."""
    import hashlib

    from adapters.demo import RandomAdapterSpec, write_random_adapter

    stamp = hashlib.sha256((Path(base) / "config.json").read_bytes()).hexdigest()[:16] + f":{rank}"
    paths = []
    for i in range(n):
        folder = out / f"rand-{i:02d}"
        marker = folder / ".base-stamp"
        if not (marker.is_file() and marker.read_text() == stamp):
            spec = RandomAdapterSpec(folder.name, seed=1000 + i, rank=rank)
            write_random_adapter(base, folder, spec, base_name)
            marker.write_text(stamp)
        paths.append(folder)
    return paths


@contextlib.contextmanager
def workdir(path: Path | None, prefix: str) -> Iterator[Path]:
    """`path` (created) when given, else a temporary folder removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def private_copies(cfg: C, work: Path) -> tuple[C, Path]:
    """Copy the adapters into ``work/adapters`` (the folder the gateways serve) and, with
    ``snapshot_base``, the base into ``work/base``: a shared cache may be rebuilt under a starting
    vLLM. Returns the configuration pointing at the copied base, and the adapters' folder."""
    if cfg.snapshot_base:
        snap = work / "base" / cfg.served_base
        shutil.copytree(cfg.base, snap, dirs_exist_ok=True)
        cfg = dataclasses.replace(cfg, base=snap)  # type: ignore[type-var]  # a dataclass (the protocol)
    adapters_dir = work / "adapters"
    for a in cfg.adapters:
        shutil.copytree(a, adapters_dir / Path(a).name, dirs_exist_ok=True)
    return cfg, adapters_dir


def attached_gateway(
    cfg: ScenarioConfig,
    urls: Sequence[str],
    adapters_dir: Path,
    *,
    resident: int,
    max_loras: int,
    max_cpu_loras: int,
    health_interval_s: float,
) -> dict[str, Any]:
    """The settings of a gateway attached to the vLLM at ``urls`` (one, or replicas), serving the
    adapters of ``adapters_dir`` and keeping ``resident`` of them loaded on each engine."""
    where = {"url": urls[0]} if len(urls) == 1 else {"urls": list(urls)}
    engine = {
        "mode": "attached",
        **where,
        "model": str(Path(cfg.base).absolute()),
        "served_model_name": cfg.served_base,
        "max_loras": max_loras,
        "max_cpu_loras": max_cpu_loras,
        "max_lora_rank": max_lora_rank(cfg.adapters),
        "health_interval_s": health_interval_s,
    }
    return {"engine": engine, "adapters_dir": str(adapters_dir), "registry": {"max_resident": resident}}


def unload_all(vllm_url: str) -> list[str]:
    """Unload every adapter vLLM lists (between two gateways sharing one vLLM)."""
    with httpx.Client(base_url=vllm_url, timeout=60, trust_env=False) as c:
        names = [m["id"] for m in c.get("/v1/models").json()["data"] if m.get("parent")]
        for name in names:
            c.post("/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()
    return names


def served_models(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(url + "/v1/models", timeout=30, trust_env=False).json()["data"]}


def require_registered(gateway: Server, names: Sequence[str]) -> None:
    """Fail, with the gateway's log, unless it lists every adapter in ``names``."""
    missing = set(names) - served_models(gateway.url)
    if missing:
        raise RuntimeError(f"the gateway did not register {sorted(missing)}:\n{gateway.log_tail()}")
