"""`lora-gateway serve --workers 2` against the session's vLLM: two gateway processes on one port.

- The adapters in adapters_dir are registered once (not once per worker), and every answer, sent on new
  connections so the kernel spreads them, is its model's own.
- Both workers serve (each one's CPU time grows under the traffic).
- An adapter registered through one worker is served by all of them within the registry's poll interval.
- A worker killed with SIGKILL is replaced, and requests go on meanwhile.
- SIGTERM stops the parent and every worker; the port closes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.conftest import ENGINE_KEY, ROOT, free_port, stop
from tests.registry_helpers import PROMPT, write_adapter

pytestmark = pytest.mark.engine

MODELS = ("tiny-llama", "w-a", "w-b")


def greedy(model: str) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}


def answer(url: str, model: str) -> str:
    r = httpx.post(url + "/v1/completions", json=greedy(model), timeout=120)  # a new connection each time
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def workers_of(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The live worker processes (uvicorn spawns them; a killed one is a zombie until reaped)."""
    found = []
    for child in psutil.Process(proc.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # gone meanwhile
            continue
    return found


def wait_for(condition, what: str, timeout: float = 60) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_two_workers_share_one_port_one_registry_and_one_vllm(
    vllm_url: str, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path
) -> None:
    adapters = tmp_path / "adapters"
    for i, name in enumerate(("w-a", "w-b")):
        write_adapter(tiny_cache["base"], adapters / name, seed=8200 + i)
    incoming = tmp_path / "incoming"
    write_adapter(tiny_cache["base"], incoming / "w-c", seed=8210)
    port = free_port()
    config = {
        "port": port,
        "cache_dir": str(cache_dir),
        "data_dir": str(tmp_path / "data"),
        "adapters_dir": str(adapters),
        "engine": {"mode": "attached", "url": vllm_url, "api_key": ENGINE_KEY, "health_interval_s": 0.5},
        "registry": {"allowed_roots": [str(incoming)], "poll_interval_s": 0.3},
    }
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--config",
            str(tmp_path / "gateway.yaml"),
            "--workers",
            "2",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url), "the workers never became healthy", timeout=120)
        wait_for(lambda: len(workers_of(proc)) == 2, "two worker processes")
        versions = {a["name"]: len(a["versions"]) for a in httpx.get(url + "/admin/adapters").json()["data"]}
        assert versions == {"w-a": 1, "w-b": 1}, "adapters_dir registered once, not once per worker"

        expected = {m: answer(url, m) for m in MODELS}
        assert len(set(expected.values())) == len(MODELS), expected
        cpu_before = {p.pid: sum(p.cpu_times()[:2]) for p in workers_of(proc)}
        # The kernel hands each connection to whichever worker accepts first: under a loaded box one worker
        # can take a whole batch. Up to 4 batches of 60, every answer checked, until both have served.
        for _ in range(4):
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda i: (MODELS[i % 3], answer(url, MODELS[i % 3])), range(60)))
            wrong = [(m, t) for m, t in got if t != expected[m]]
            assert not wrong, wrong[:5]
            grew = [p.pid for p in workers_of(proc) if sum(p.cpu_times()[:2]) > cpu_before[p.pid] + 0.05]
            if len(grew) == 2:
                break
        assert len(grew) == 2, f"only {grew} of {list(cpu_before)} served"

        r = httpx.post(
            url + "/admin/adapters", json={"name": "w-c", "source": str(incoming / "w-c")}, timeout=60
        )
        assert r.status_code == 201, r.text
        time.sleep(1.0)  # > poll_interval_s: every worker has seen it
        with ThreadPoolExecutor(4) as pool:
            statuses = list(
                pool.map(
                    lambda _: (
                        httpx.post(url + "/v1/completions", json=greedy("w-c"), timeout=120).status_code
                    ),
                    range(12),
                )
            )
        assert statuses == [200] * 12

        victim = workers_of(proc)[0]
        victim.kill()
        with ThreadPoolExecutor(2) as pool:  # the survivor answers meanwhile (a refused connect is retried)
            assert all(t == expected["w-a"] for t in pool.map(lambda _: answer(url, "w-a"), range(6)))
        wait_for(
            lambda: len(workers_of(proc)) == 2 and victim.pid not in {p.pid for p in workers_of(proc)},
            "replaced",
        )
        wait_for(lambda: healthy(url), "healthy again")
    finally:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        stop(proc)
        log.close()
    assert proc.returncode == 0, (tmp_path / "gateway.log").read_text()[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"workers left running: {alive}"
    assert not healthy(url)
