"""Several gateways starting at the same moment over one adapter store and one registry (a Kubernetes
rollout of a 2-replica Deployment, `serve --workers`): each one's start-up clean-up of the store ran while
another was staging its adapters into it, and deleted that folder: the other crashed with
FileNotFoundError in `blobs.stage` (issue 16). Three real `lora-gateway serve` processes, seeding the same
adapters_dir into one SQLite registry and one store, all started at once: every one comes up and lists
every adapter, and no unfinished write is left behind. No engine is needed (start-up does not wait for one).
With the clean-up deleting every unfinished write, as it did, this failed 2 runs of 3 here.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.conftest import ROOT, free_port
from tests.registry_helpers import write_adapter

GATEWAYS = 3
ADAPTERS = ("t-a", "t-b", "t-c", "t-d")


def test_gateways_starting_together_over_one_store_all_come_up(
    cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path
) -> None:
    adapters = tmp_path / "adapters"
    for i, name in enumerate(ADAPTERS):
        write_adapter(tiny_cache["base"], adapters / name, seed=9300 + i)
    store = tmp_path / "store"
    procs, urls = [], []
    for i in range(GATEWAYS):
        port = free_port()
        config = {
            "port": port,
            "cache_dir": str(cache_dir),
            "data_dir": str(tmp_path / f"data-{i}"),
            "adapters_dir": str(adapters),
            "log_level": "warning",
            "engine": {"mode": "attached", "url": f"http://127.0.0.1:{free_port()}", "health_interval_s": 5},
            "registry": {"url": str(tmp_path / "registry.sqlite3"), "store_dir": str(store)},
        }
        path = tmp_path / f"gateway-{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        urls.append(f"http://127.0.0.1:{port}")
        procs.append((path, tmp_path / f"gateway-{i}.log"))
    running = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        for path, log in procs
    ]  # all at once
    try:
        for url, proc, (_, log) in zip(urls, running, procs, strict=True):
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, f"a gateway died at start:\n{log.read_text()[-3000:]}"
                try:
                    r = httpx.get(url + "/admin/adapters", timeout=2)
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"{url} never came up:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
        time.sleep(1.0)  # one registry poll: each has seen the others' registrations
        for url in urls:
            listed = {a["name"] for a in httpx.get(url + "/admin/adapters", timeout=5).json()["data"]}
            assert listed == set(ADAPTERS), (url, listed)
        assert not [p.name for p in store.iterdir() if p.name.startswith(".tmp")], "unfinished writes left"
    finally:
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        for proc in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
