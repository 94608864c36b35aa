"""Running a server for a benchmark or a test: in a thread (any ASGI app) or in a subprocess.

The thread form follows httpx's own test suite (``serve_in_thread``): a real uvicorn server on a
socket bound to a free loopback port, so requests take the real HTTP path. A subprocess gives
the server its own interpreter (its own GIL), which benchmarks want. The tests use the same
``free_port`` and threads (``tests/conftest.py``'s in-process gateways).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", log_level: str = "warning") -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn in a daemon thread; yields ``http://host:port``."""
    with serve_server_in_thread(app, host, log_level) as (url, _):
        yield url


@contextlib.contextmanager
def serve_server_in_thread(
    app: Any,
    host: str = "127.0.0.1",
    log_level: str = "warning",
    *,
    start_timeout_s: float = 10.0,
    stop_timeout_s: float = 10.0,
    http: Any = "auto",
) -> Iterator[tuple[str, Any]]:
    """``serve_in_thread``, yielding the ``uvicorn.Server`` too (set its ``should_exit`` to stop it
    as SIGTERM would); on leaving, waits up to ``stop_timeout_s`` for its shutdown."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, lifespan="on", server_header=False, http=http
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=stop_timeout_s)
        sock.close()


def wait_ready(
    url: str, timeout_s: float = 15.0, proc: subprocess.Popen[bytes] | None = None, path: str = "/health"
) -> None:
    """Poll ``url + path`` until it answers 200; fail early if ``proc`` exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + path, timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout_s:g} s")
        time.sleep(0.05)


@contextlib.contextmanager
def serve_in_subprocess(
    argv: Sequence[str], url: str, *, env: Mapping[str, str] | None = None, timeout_s: float = 30.0
) -> Iterator[str]:
    """Start ``argv``, wait until ``url`` answers ``/health``, yield ``url``, then stop it."""
    proc = subprocess.Popen(list(argv), env=dict(env) if env is not None else None)
    try:
        wait_ready(url, timeout_s=timeout_s, proc=proc)
        yield url
    finally:
        stop(proc, grace_s=10)


def stop(proc: subprocess.Popen[Any], *, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``grace_s``."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
