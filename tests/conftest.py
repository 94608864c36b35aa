"""Shared fixtures. The real vLLM server starts once per test session, behind a real gateway process.

- `tiny_cache`: the embedded base model and demo adapters (built once, cached like `make serve` does).
- `gateway_proc`: `lora-gateway serve` in managed mode as a subprocess (it spawns vLLM), started once.
- `gateway_url` / `vllm_url`: its URLs; `client`: the official OpenAI SDK pointed at the gateway.
- `serve_app(settings)`: another gateway, in-process on a free loopback port (attached mode reuses
  the session's vLLM, so it starts in a moment).
- `ENGINE_KEY` / `ENGINE_AUTH`: the session vLLM's key (`engine.api_key`); a test calling vLLM's /v1
  routes itself sends `ENGINE_AUTH`, and `attached_settings` gives the key to the gateways it builds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
import yaml
from fastapi import FastAPI

from gateway.settings import Settings
from loadtest.servers.serving import free_port, serve_server_in_thread

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 420
# The session vLLM answers 401 on /v1 without it. A constant: pytest imports this file as `conftest` and
# tests import it again as `tests.conftest`, so a random value would differ between the two.
ENGINE_KEY = "session-engine-key"
ENGINE_AUTH = {"authorization": f"Bearer {ENGINE_KEY}"}


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The same cache `make serve` uses (LORA_GATEWAY_CACHE_DIR or ~/.cache/lora-gateway)."""
    return Settings().cache_dir


@pytest.fixture(scope="session")
def tiny_cache(cache_dir: Path) -> dict[str, Path]:
    from adapters.demo import build_demo_adapters
    from adapters.tiny import TINY_NAME, build_tiny

    base = build_tiny(cache_dir)
    demos = build_demo_adapters(cache_dir, base, TINY_NAME)
    return {"base": base, **demos}


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("session")


class GatewayProcess:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, vllm_url: str, log_path: Path) -> None:
        self.proc = proc
        self.url = url
        self.vllm_url = vllm_url
        self.log_path = log_path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"gateway not healthy after {timeout} s:\n{self.log_tail()}")


@pytest.fixture(scope="session")
def session_src(session_tmp: Path) -> Path:
    """A folder the session gateway may register adapters from (`registry.allowed_roots`)."""
    path = session_tmp / "src"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def gateway_proc(
    tiny_cache: dict[str, Path], cache_dir: Path, session_tmp: Path, session_src: Path
) -> Iterator[GatewayProcess]:
    port, vllm_port = free_port(), free_port()
    config = {
        "port": port,
        "cache_dir": str(cache_dir),
        "data_dir": str(session_tmp / "data"),
        "engine": {
            "port": vllm_port,
            "max_loras": 2,
            "max_cpu_loras": 4,
            "health_interval_s": 1.0,
            "api_key": ENGINE_KEY,
            # chat `tools` (tests/test_openai_surface_e2e.py): vLLM's --enable-auto-tool-choice and a
            # parser; it changes nothing for requests without tools
            "tool_call_parser": "hermes",
        },
        "registry": {"allowed_roots": [str(session_src)]},
    }
    config_path = session_tmp / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = session_tmp / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_GATEWAY_")}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    gw = GatewayProcess(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{vllm_port}", log_path)
    try:
        gw.wait_healthy()
        yield gw
    finally:
        stop(proc)
        _assert_port_closed(vllm_port)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """SIGTERM, as an orchestrator stops a gateway; SIGKILL if it is not gone within `timeout_s`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _assert_port_closed(port: int) -> None:
    """The gateway's shutdown must stop the vLLM it started."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"vLLM still listening on port {port} after the gateway stopped")


@pytest.fixture
def gateway(gateway_proc: GatewayProcess) -> GatewayProcess:
    """The session gateway, healthy (a test that restarts vLLM may have run before)."""
    gateway_proc.wait_healthy()
    return gateway_proc


@pytest.fixture
def gateway_url(gateway: GatewayProcess) -> str:
    return gateway.url


@pytest.fixture
def vllm_url(gateway: GatewayProcess) -> str:
    return gateway.vllm_url


@pytest.fixture
def client(gateway_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@contextlib.contextmanager
def serve_app_server(
    settings: Settings,
    *,
    wait_ready: bool = True,
    ready_timeout: float = 120,
    extend: Callable[[FastAPI], None] | None = None,
    engine_client: Any = None,
) -> Iterator[tuple[str, uvicorn.Server]]:
    """Run a gateway built from `settings` in a thread on a free loopback port (`serve_server_in_thread`);
    yield its URL and server.
    `extend(app)` may add to the app first (a test's stand-in route); `engine_client` replaces the
    aiohttp client towards the engines (tests/fake_engine.py)."""
    from gateway.app import create_app

    app = create_app(settings) if engine_client is None else create_app(settings, lambda _: engine_client)
    if extend is not None:
        extend(app)
    deadline = time.monotonic() + ready_timeout
    from gateway.relay.client import RelayHttpProtocol

    served = serve_server_in_thread(
        app, start_timeout_s=ready_timeout, stop_timeout_s=60, http=RelayHttpProtocol
    )
    with served as (url, server):
        if wait_ready:
            while httpx.get(url + "/health", timeout=5).status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("in-process gateway never saw its engine ready")
                time.sleep(0.1)
        yield url, server


@contextlib.contextmanager
def serve_app(
    settings: Settings,
    *,
    wait_ready: bool = True,
    ready_timeout: float = 120,
    extend: Callable[[FastAPI], None] | None = None,
    engine_client: Any = None,
) -> Iterator[str]:
    """Run a gateway built from `settings` in a thread on a free loopback port; yield its URL."""
    served = serve_app_server(
        settings,
        wait_ready=wait_ready,
        ready_timeout=ready_timeout,
        extend=extend,
        engine_client=engine_client,
    )
    with served as (url, _):
        yield url


def attached_settings(vllm_url: str, cache_dir: Path, tmp_path: Path, **overrides: object) -> Settings:
    engine = {
        "mode": "attached",
        "url": vllm_url,
        "health_interval_s": 0.5,
        "max_cpu_loras": 4,
        "api_key": ENGINE_KEY,
    }
    engine.update(overrides.pop("engine", {}))  # type: ignore[arg-type]
    return Settings(
        cache_dir=cache_dir,
        data_dir=tmp_path / "data",
        engine=engine,
        **overrides,  # type: ignore[arg-type]
    )


class UpstreamProcess:
    def __init__(self, proc: subprocess.Popen[bytes], url: str) -> None:
        self.proc = proc
        self.url = url

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def upstream_process(*args: str) -> Iterator[UpstreamProcess]:
    """`loadtest.servers.fast_upstream` (a fast OpenAI-compatible server standing for vLLM) in a process."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.servers.fast_upstream", "--host", "127.0.0.1", "--port", str(port)]
        + list(args),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    upstream = UpstreamProcess(proc, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(upstream.url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("fast upstream did not start")
            time.sleep(0.1)
        yield upstream
    finally:
        if proc.poll() is None:
            upstream.kill()


# A real PostgreSQL server (tests/pg.py), started only when a test asks for it.
# The access log's lines, decoded (tests/access_log.py).
from tests.access_log import access_lines  # noqa: E402, F401
from tests.pg import postgres_url  # noqa: E402, F401

# A real Redis (tests/redis_server.py), started only when a test asks for it.
from tests.redis_server import redis_url  # noqa: E402, F401
