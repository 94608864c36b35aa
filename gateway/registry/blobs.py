"""Content-addressed adapter store: `<root>/<sha256>/` holds one adapter's files and never changes.

The digest is the sha256 of a canonical manifest, one line per stored file sorted by name, in
`sha256sum` format: `<file sha256 hex>  <file name>\\n`. Only `STORED_FILES` are ever copied
(adapter_config.json, adapter_model.safetensors, README.md), so nothing else from a source folder
can reach the engine.

Crash safety: files are copied into `<root>/.tmp-<random>/` (same filesystem), fsynced, the folder
fsynced, then renamed to `<root>/<sha256>/` and the root fsynced. A `<sha256>/` folder is therefore
complete or absent. Removal renames to `.trash-<random>` first, then deletes. Temporary names carry
their writer (`<host>~<pid>`); `cleanup_partial()`, which the app calls at startup, deletes leftover `.tmp-*`
and `.trash-*` entries only when provably abandoned (this host's writer has exited, or older than
`ABANDONED_AFTER_S`): several gateways share one store and may be staging right now.

Two phases, so the bytes that were validated are the bytes that are stored:

    staged = blobs.stage(src)                 # copy + hash into a temp folder
    try:
        validate_adapter_dir(staged.path, ...)
    except Exception:
        blobs.discard(staged)
        raise
    path = blobs.commit(staged)               # atomic rename (or reuse of an identical blob)

`ingest(src)` does stage + commit in one call. All methods block: call them through a thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Collection, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from adapters.validate import CONFIG_FILE, STORED_FILES, WEIGHTS_FILE, AdapterValidationError, open_regular

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
# A temporary entry older than this has no live writer, whoever wrote it (staging takes seconds).
ABANDONED_AFTER_S = 6 * 3600.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StagedBlob:
    """Files copied and hashed into a temporary folder, not yet visible in the store."""

    digest: str
    path: Path
    files: Mapping[str, str]  # file name -> sha256 hex
    size_bytes: int


def manifest_digest(files: Mapping[str, str]) -> str:
    """The store digest of a set of files given as {name: sha256 hex}."""
    manifest = "".join(f"{files[name]}  {name}\n" for name in sorted(files))
    return hashlib.sha256(manifest.encode("utf-8")).hexdigest()


class BlobStore:
    """Adapter folders under `root`, named by the digest of their content."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        files: Iterable[str] = STORED_FILES,
        required: Collection[str] = (CONFIG_FILE, WEIGHTS_FILE),
    ) -> None:
        self.root = Path(root).absolute()
        self.files = tuple(files)
        self.required = frozenset(required)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not _DIGEST_RE.fullmatch(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_dir()

    def list_digests(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.root) if _DIGEST_RE.fullmatch(e.name) and e.is_dir())

    def stage(self, src_dir: str | os.PathLike[str], *, max_bytes: int | None = None) -> StagedBlob:
        """Copy the allowed files of `src_dir` into a temporary folder, hashing and fsyncing them.

        Raises `AdapterValidationError` (`missing_file`, `unsafe_file` for a non-regular file,
        `too_large` when the copied bytes exceed `max_bytes`).
        """
        tmp = self.root / f"{_TMP_PREFIX}{_writer()}-{secrets.token_hex(8)}"
        tmp.mkdir(mode=0o755)
        try:
            hashes, total = self._hash_files(Path(src_dir), tmp, max_bytes)
            _fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return StagedBlob(manifest_digest(hashes), tmp, hashes, total)

    def digest_of(self, src_dir: str | os.PathLike[str], *, max_bytes: int | None = None) -> str:
        """The digest `stage` would give `src_dir`, read in place: nothing copied or fsynced (a start that
        finds its adapters folder unchanged reads each file once and writes nothing). Raises as `stage`."""
        return manifest_digest(self._hash_files(Path(src_dir), None, max_bytes)[0])

    def _hash_files(self, src: Path, dst: Path | None, max_bytes: int | None) -> tuple[dict[str, str], int]:
        """Hash the allowed files of `src` (copying each into `dst` when given): {name: sha256}, bytes."""
        hashes: dict[str, str] = {}
        total = 0
        for name in self.files:
            if not (src / name).exists():
                if name in self.required:
                    raise AdapterValidationError(f"The adapter has no {name}.", "missing_file", name)
                continue
            budget = None if max_bytes is None else max_bytes - total
            hashes[name], size = _copy_file(src / name, None if dst is None else dst / name, budget)
            total += size
        return hashes, total

    def commit(self, staged: StagedBlob) -> Path:
        """Move a staged folder into place; if the digest is already stored, keep that one."""
        target = self.path(staged.digest)
        if target.is_dir():
            self.discard(staged)
            os.utime(target)  # fresh mtime: `gc(min_age_s=...)` leaves it alone for a while
            return target
        try:
            os.rename(staged.path, target)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.is_dir():
                raise
            self.discard(staged)  # an identical blob won the race
            return target
        _fsync_dir(self.root)
        return target

    def discard(self, staged: StagedBlob) -> None:
        shutil.rmtree(staged.path, ignore_errors=True)

    def ingest(self, src_dir: str | os.PathLike[str], *, max_bytes: int | None = None) -> tuple[str, Path]:
        """Stage and commit in one step; returns (digest, folder). Idempotent for identical content."""
        staged = self.stage(src_dir, max_bytes=max_bytes)
        return staged.digest, self.commit(staged)

    def verify(self, digest: str) -> bool:
        """Whether the stored folder still hashes to its name."""
        folder = self.path(digest)
        try:
            names = sorted(e.name for e in os.scandir(folder))
            hashes = {name: _copy_file(folder / name, None, None)[0] for name in names}
        except (OSError, AdapterValidationError):
            return False
        return manifest_digest(hashes) == digest

    def remove(self, digest: str) -> bool:
        """Delete a stored folder (renamed away first, so no half-deleted `<sha256>/` is ever visible)."""
        target = self.path(digest)
        trash = self.root / f"{_TRASH_PREFIX}{_writer()}-{secrets.token_hex(8)}"
        try:
            os.rename(target, trash)
        except FileNotFoundError:
            return False
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def gc(self, keep: Collection[str], *, min_age_s: float = 0.0) -> list[str]:
        """Remove every stored digest not in `keep` and untouched for `min_age_s`; returns those removed.

        `min_age_s` protects blobs committed by a registration whose database row is not written yet.
        """
        removed = []
        now = time.time()
        for digest in self.list_digests():
            if digest in keep:
                continue
            try:
                if now - self.path(digest).stat().st_mtime < min_age_s:
                    continue
            except FileNotFoundError:
                continue
            if self.remove(digest):
                removed.append(digest)
        return removed

    def cleanup_partial(self, *, min_age_s: float = ABANDONED_AFTER_S) -> int:
        """Delete leftover temporary and trash folders that are provably abandoned; returns how many.

        The store may be shared by several gateways (replicas, `serve --workers`), any of which may be
        staging an adapter right now. An entry is abandoned when its writer (host and pid in its name) is
        this host's and that process is gone, or when it is older than `min_age_s` (another host's
        writer, or a name without one)."""
        count = 0
        now = time.time()
        for entry in os.scandir(self.root):
            if not entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                continue
            try:
                old = now - entry.stat(follow_symlinks=False).st_mtime >= min_age_s
            except FileNotFoundError:
                continue
            if not old and not _writer_gone(entry.name):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            count += 1
        return count


def _host() -> str:
    """This host's name as a temporary entry records it (without '-' or '~', the name's separators)."""
    return socket.gethostname().replace("-", "_").replace("~", "_")


def _writer() -> str:
    """Who is writing a temporary entry: `<host>~<pid>`."""
    return f"{_host()}~{os.getpid()}"


def _writer_gone(name: str) -> bool:
    """True when `name` (`.tmp-<host>~<pid>-<random>`) was written by an exited process of this host."""
    body = name.split("-", 1)[1] if "-" in name else ""
    writer, _, _ = body.rpartition("-")
    host, sep, pid = writer.partition("~")
    if not sep or not pid.isdigit():
        return False  # no writer recorded: only its age tells
    if host != _host():
        return False  # another host's: its processes are not visible here
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False  # alive (perhaps this very process): writing now


def _copy_file(src: Path, dst: Path | None, budget: int | None) -> tuple[str, int]:
    """Hash `src` (and copy it to a new file `dst`, fsynced, read-only); returns (sha256, size)."""
    digest = hashlib.sha256()
    size = 0
    with open_regular(src) as fin, ExitStack() as stack:
        fout = None if dst is None else stack.enter_context(open(dst, "xb"))
        while chunk := fin.read(_CHUNK):
            size += len(chunk)
            if budget is not None and size > budget:
                msg = f"The adapter's files exceed the size limit while copying {src.name}."
                raise AdapterValidationError(msg, "too_large", "source")
            digest.update(chunk)
            if fout is not None:
                fout.write(chunk)
        if fout is not None:
            fout.flush()
            os.fsync(fout.fileno())
    if dst is not None:
        os.chmod(dst, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    return digest.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
