"""Adapter files sent to `POST /admin/adapters` itself, for a gateway that shares no filesystem with the
operator (Kubernetes, another host): a tar stream or a multipart form, into a folder the registry then
validates exactly as it validates a local one.

    POST /admin/adapters?name=sql&description=v2&pin=true      Content-Type: application/x-tar
         (a tar of the adapter folder's files; gzip-compressed is accepted too: application/gzip)
    POST /admin/adapters                                       Content-Type: multipart/form-data
         fields name, description, pin, force, origin; one file part per adapter file (its filename)

`lora-gateway adapters register NAME ./folder --url URL` sends the tar form when the gateway cannot read
the folder itself. What is accepted, checked as the bytes arrive:
- the body is counted as it streams to a temporary file under `<data_dir>/uploads/`: past
  `registry.max_adapter_bytes` plus `FRAMING_BYTES` (tar headers, multipart boundaries) it is refused with
  413 and nothing is kept;
- only plain files directly in the adapter folder (a leading `./` or one top folder is allowed, as `tar -C`
  and `tar folder/` write them), at most `MAX_FILES`; links, devices, nested paths, `..`, absolute names
  and a name given twice are refused (400 `invalid_upload`), never written;
- then the registry's own path: pickles and code files refused, the config and weights checked against
  the base, a copy staged into the content-addressed store and committed atomically. The temporary
  folder is removed on every path, and a gateway that died mid-upload leaves only `uploads/` entries that
  the next upload removes after `STALE_AFTER_S`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from gateway.errors import InvalidRequestError, PayloadTooLargeError

TAR_TYPES = frozenset(
    {"application/x-tar", "application/tar", "application/gzip", "application/x-gzip", "application/x-gtar"}
)
MULTIPART = "multipart/form-data"
#: Room for tar headers and padding or multipart boundaries above the adapter's own bytes.
FRAMING_BYTES = 1 << 20
MAX_FILES = 32
#: Upload folders older than this are a dead gateway's leftovers.
STALE_AFTER_S = 6 * 3600.0
_CHUNK = 1 << 20


def is_upload(content_type: str | None) -> bool:
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return kind in TAR_TYPES or kind == MULTIPART


@dataclass
class Upload:
    """The adapter folder as received, and the form fields (multipart) or query parameters (tar)."""

    folder: Path
    fields: dict[str, str]

    def remove(self) -> None:
        shutil.rmtree(self.folder.parent, ignore_errors=True)


def _invalid(message: str, param: str | None = "file") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="invalid_upload")


async def receive(request: Request, uploads_dir: Path, max_bytes: int) -> Upload:
    """Read the request's body into a new folder under `uploads_dir` (see the module docstring)."""
    limit = max_bytes + FRAMING_BYTES
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"The upload is {declared} bytes; this gateway takes at most {limit}.")
    work = await asyncio.to_thread(_workspace, uploads_dir)
    try:
        folder = work / "adapter"
        kind = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if kind == MULTIPART:
            fields = await _multipart(request, folder, limit)
        else:
            body = work / "body.tar"
            out = await asyncio.to_thread(body.open, "wb")
            try:
                async for chunk in _capped(request, limit):
                    await asyncio.to_thread(out.write, chunk)
            finally:
                await asyncio.to_thread(out.close)
            await asyncio.to_thread(_untar, body, folder, max_bytes)
            body.unlink()
            fields = dict(request.query_params)
        return Upload(folder, fields)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, work, True)
        raise


def _workspace(uploads_dir: Path) -> Path:
    uploads_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in uploads_dir.iterdir():  # a dead gateway's leftovers
        try:
            if now - old.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(old, ignore_errors=True)
        except FileNotFoundError:
            pass
    work = uploads_dir / f"upload-{uuid.uuid4().hex}"
    (work / "adapter").mkdir(parents=True)
    return work


async def _capped(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"The upload is over the limit of {limit} bytes.")
        if chunk:
            yield chunk


def _file_name(raw: str | None) -> str:
    """The name a file takes in the adapter folder: one plain path component (`./x` and `top/x` too)."""
    if not raw or "\x00" in raw or "\\" in raw:
        raise _invalid(f"Malformed file name {raw!r} in the upload.")
    path = PurePosixPath(raw)
    parts = [p for p in path.parts if p != "."]
    if path.is_absolute() or ".." in parts or not parts or len(parts) > 2:
        raise _invalid(f"{raw!r}: only the files of the adapter folder itself are accepted, no paths.")
    name = parts[-1]
    if name.startswith("."):
        raise _invalid(f"{raw!r}: hidden files are not accepted.")
    return name


def _untar(body: Path, folder: Path, max_bytes: int) -> None:
    """Extract the plain files of the tar at `body` into `folder`, refusing anything else (no extraction
    filter needed: each member's bytes are copied to a name chosen here, never to the member's path)."""
    seen: set[str] = set()
    total = 0
    top: str | None = None
    try:
        with tarfile.open(body, "r:*") as archive:
            for member in archive:
                parts = [p for p in PurePosixPath(member.name).parts if p != "."]
                if member.isdir():
                    if len(parts) > 1:
                        raise _invalid(f"{member.name!r}: nested folders are not accepted.")
                    continue
                if not member.isreg():
                    raise _invalid(f"{member.name!r} is not a plain file (links and devices are refused).")
                name = _file_name(member.name)
                if len(parts) == 2:
                    if top not in (None, parts[0]):
                        raise _invalid("The upload holds more than one folder.")
                    top = parts[0]
                if name in seen:
                    raise _invalid(f"{name!r} is given twice.")
                seen.add(name)
                if len(seen) > MAX_FILES:
                    raise _invalid(f"More than {MAX_FILES} files in the upload.")
                total += member.size
                if total > max_bytes:
                    raise PayloadTooLargeError(
                        f"The adapter's files are over the limit of {max_bytes} bytes."
                    )
                source = archive.extractfile(member)
                assert source is not None  # a regular member
                _write(folder / name, source)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _invalid(f"The upload is not a readable tar stream: {exc}") from None
    if not seen:
        raise _invalid("The upload holds no files.")


def _write(path: Path, source: IO[bytes]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # a fresh file, never through a link
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(source, out, _CHUNK)


async def _multipart(request: Request, folder: Path, limit: int) -> dict[str, str]:
    parser = MultiPartParser(request.headers, _capped(request, limit), max_files=MAX_FILES, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise _invalid(f"The multipart body cannot be read: {exc.message}") from None
    fields: dict[str, str] = {}
    seen: set[str] = set()
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                name = _file_name(value.filename)
                if name in seen:
                    raise _invalid(f"{name!r} is given twice.")
                seen.add(name)
                await asyncio.to_thread(_write_upload, folder / name, value)
            elif key in fields:
                raise _invalid(f"The field {key!r} is given twice.", key)
            else:
                fields[key] = value
    finally:
        await form.close()
    if not seen:
        raise _invalid("The upload holds no files.")
    return fields


def _write_upload(path: Path, upload: UploadFile) -> None:
    upload.file.seek(0)
    _write(path, upload.file)
