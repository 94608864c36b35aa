"""A client of a running gateway's admin API (`gateway/api/admin.py`): one call, its JSON answer or one error.

    call("http://127.0.0.1:8000", token, "POST", "/admin/adapters", body={"name": "sql", "source": "/srv/a"})

`register_folder` registers a local adapter folder: by its path when the gateway can read it (same machine,
under one of its allowed roots), else by uploading its files as a tar stream (`gateway/api/upload.py`).

`lora-gateway adapters ...` (`gateway/cli_adapters.py`), `lora-gateway train --register`
(`adapters/report.py`) and the routing load test (`loadtest/routing/run.py`) all call through it. Every
failure is an `AdminError`: the gateway's OpenAI-shaped error (message, code, param), code
`gateway_unreachable` when no answer came, or the bare HTTP status when the answer is not JSON.
"""

from __future__ import annotations

import ipaddress
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx

# Registration may download from the Hub and hash large files: allow a long read.
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=5.0)


class AdminError(Exception):
    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param

    def describe(self) -> str:
        """`message (code: ..., param: ...)`, as the CLIs print a refusal."""
        details = ", ".join(f"{k}: {v}" for k, v in (("code", self.code), ("param", self.param)) if v)
        return self.message + (f" ({details})" if details else "")


def call(
    url: str,
    token: str | None,
    method: str,
    path: str,
    *,
    body: Any = None,
    params: Any = None,
    content: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    trust_env: bool = True,
) -> Any:
    """One admin API call; returns the decoded JSON, raises `AdminError` for any failure."""
    headers = {**(headers or {}), **({"authorization": f"Bearer {token}"} if token else {})}
    try:
        r = httpx.request(
            method,
            url.rstrip("/") + path,
            json=body,
            params=params,
            content=content,
            headers=headers,
            timeout=timeout,
            trust_env=trust_env,
        )
    except httpx.HTTPError as exc:
        raise AdminError(f"Cannot reach the gateway at {url}: {exc}", "gateway_unreachable") from exc
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.is_success and data is not None:
        return data
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        raise AdminError(str(error.get("message")), error.get("code"), error.get("param"))
    raise AdminError(f"HTTP {r.status_code} from {url}: {r.text[:200]}", str(r.status_code))


#: Refusals of a path registration that mean "this gateway cannot read that folder": upload it instead.
UPLOAD_INSTEAD = frozenset({"source_not_allowed", "source_not_found"})


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register_folder(
    url: str,
    token: str | None,
    name: str,
    folder: str | os.PathLike[str],
    *,
    upload: bool | None = None,
    description: str = "",
    pin: bool = False,
    force: bool = False,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
) -> Any:
    """Register the adapter in local `folder` as NAME. `upload`: None sends the path to a gateway on this
    machine (a loopback URL) and uploads if it cannot read it, and uploads to any other gateway; True always
    uploads; False never does."""
    path = Path(folder).expanduser().resolve()
    meta = {"name": name, "description": description, "pin": pin, "force": force}
    if upload is not True and (upload is False or is_loopback(url)):
        try:
            body = {**meta, "source": str(path)}
            return call(url, token, "POST", "/admin/adapters", body=body, timeout=timeout)
        except AdminError as exc:
            if upload is False or exc.code not in UPLOAD_INSTEAD:
                raise
    if not path.is_dir():
        raise AdminError(f"{folder} is not a folder.", "source_not_found", "source")
    with tempfile.TemporaryFile() as spool:
        if tar_folder(path, spool) == 0:
            raise AdminError(f"{folder} holds no files.", "source_not_found", "source")
        size = spool.tell()
        spool.seek(0)
        params = {k: str(v).lower() if isinstance(v, bool) else v for k, v in meta.items()}
        params["origin"] = f"{os.uname().nodename}:{path}"
        return call(
            url,
            token,
            "POST",
            "/admin/adapters",
            params=params,
            content=_chunks(spool),
            headers={"content-type": "application/x-tar", "content-length": str(size)},
            timeout=timeout,
        )


def tar_folder(folder: Path, out: IO[bytes]) -> int:
    """Write the plain files directly in `folder` to `out` as a tar stream; returns how many. Sub-folders,
    links and hidden files are left out: the gateway would refuse them."""
    count = 0
    with tarfile.open(fileobj=out, mode="w|") as archive:
        for entry in sorted(folder.iterdir()):
            if entry.is_file() and not entry.is_symlink() and not entry.name.startswith("."):
                archive.add(entry, arcname=entry.name, recursive=False)
                count += 1
    return count


def _chunks(f: IO[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk
