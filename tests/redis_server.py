"""A real Redis for the tests (Debian's `redis-server`), started once per session on loopback.

- `redis_url` (session fixture): `redis://127.0.0.1:<port>/0`. No persistence (`--save ""`, no AOF), its
  folder a temp one, stopped (SIGTERM) and deleted at the end of the session. Tests share it: each uses its
  own key prefix (`limits.redis_prefix`), so none sees another's counters.

No binary is a failure, not a skip: `make test` installs it first (`make services`, .ci/test-services).
Re-exported by conftest.py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.servers.serving import free_port

MISSING = (
    "redis-server not found on PATH. `make services` installs it (as root with apt-get: redis-server) "
    "or names the command to run."
)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if binary is None:
        pytest.fail(MISSING, pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="lora-gateway-redis-"))
    port = free_port()
    log = base / "server.log"
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(base), "--save", "",
         "--appendonly", "no", "--daemonize", "no", "--logfile", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                pytest.fail(f"redis-server did not start (status {proc.poll()}):\n{tail}", pytrace=False)
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)
