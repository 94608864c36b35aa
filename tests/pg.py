"""A real PostgreSQL server for the tests, started once per session on a throwaway cluster.

- `postgres_url` (session fixture): `postgresql://postgres@127.0.0.1:<port>/registry`. The cluster is
  made by `initdb` in a temp folder (trust auth, fsync off), listens on loopback only, keeps its unix
  socket in that folder, and is stopped (`pg_ctl stop -m fast`) and deleted at the end of the session.
- `new_database(postgres_url)`: a fresh, empty database on that server; returns its URL.

PostgreSQL refuses to run as root: as root (CI) the server runs as the `postgres` OS user (`runuser`).
No binaries is a failure, not a skip: `make test` installs them first (`make services`, .ci/test-services).
Re-exported by conftest.py; psycopg is imported only when a test asks for the server.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.servers.serving import free_port

MISSING = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin. "
    "`make services` installs them (as root with apt-get) or names the command to run."
)


def _bindir() -> Path:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
    )
    for bindir in reversed(found):  # the newest version first
        if (bindir / "pg_ctl").exists():
            return bindir
    pytest.fail(MISSING, pytrace=False)


def _as_server_user() -> tuple[list[str], int | None, int | None]:
    """The command prefix, uid and gid that run the server: `postgres` under root, else ourselves."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("Running as root: the `postgres` OS user must exist. " + MISSING, pytrace=False)
    return ["runuser", "-u", "postgres", "--"], user.pw_uid, user.pw_gid


def _run(cmd: list[str], what: str, cwd: Path, log: Path | None = None) -> None:
    """`cmd` in `cwd` (the server's user may not be allowed into ours), failing the test on an error."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        pytest.fail(f"{what} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{tail}", pytrace=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    bindir = _bindir()
    prefix, uid, gid = _as_server_user()
    base = Path(tempfile.mkdtemp(prefix="lora-gateway-pg-"))
    data, log, port = base / "data", base / "server.log", free_port()
    if uid is not None and gid is not None:
        os.chown(base, uid, gid)
    started = False
    try:
        _run(
            [*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            "initdb",
            base,
        )  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c max_connections=200"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        _run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
             "-o", options, "start"],
            "pg_ctl start",
            base,
            log,
        )  # fmt: skip
        started = True
        server = f"postgresql://postgres@127.0.0.1:{port}"
        _create_database(f"{server}/postgres", "registry")
        yield f"{server}/registry"
    finally:
        if started:
            subprocess.run(
                [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                cwd=base,
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(base, ignore_errors=True)


def new_database(postgres_url: str) -> str:
    """A fresh, empty database on the session's server (about 40 ms); returns its URL."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    _create_database(postgres_url, name)
    return f"{postgres_url.rsplit('/', 1)[0]}/{name}"


def _create_database(url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
