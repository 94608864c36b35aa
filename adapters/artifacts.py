"""Files produced by training and merging: where a base model lives, fingerprints, atomic output folders.

- `resolve_base(base)`: a local folder as is; the embedded base's served name (`tiny-llama`) as its
  built folder in the gateway's cache (`$LORA_GATEWAY_CACHE_DIR`, default
  `~/.cache/lora-gateway`); anything else as a Hugging
  Face model id, downloaded once into the hub cache.
- `fingerprint_folder(folder)`: sha256 over the config and weight files, so a report names exactly
  which weights an adapter was trained on.
- `atomic_output(out)`: a temporary sibling folder that is moved into place only when the block
  succeeds, so a failure never leaves a half-written `out`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Files whose bytes define a model (weights and the config that gives them meaning).
_FINGERPRINT_PATTERNS = ("config.json", "adapter_config.json", "*.safetensors", "*.bin")


def default_cache_dir() -> Path:
    """The cache folder unless one is configured: $XDG_CACHE_HOME/lora-gateway (~/.cache/lora-gateway).
    `gateway/settings.py` defaults `cache_dir` to it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-gateway"


def cache_dir() -> Path:
    """The gateway's cache folder outside the gateway: $LORA_GATEWAY_CACHE_DIR, else the default."""
    if os.environ.get("LORA_GATEWAY_CACHE_DIR"):
        return Path(os.environ["LORA_GATEWAY_CACHE_DIR"])
    return default_cache_dir()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_folder(folder: Path | str) -> str:
    """sha256 over (relative name, file sha256) of the config and weight files, in name order."""
    folder = Path(folder)
    names = sorted({p for pattern in _FINGERPRINT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    if not names:
        raise FileNotFoundError(f"{folder}: no config or weight files to fingerprint")
    digest = hashlib.sha256()
    for path in names:
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return "sha256:" + digest.hexdigest()


def is_embedded_base(folder: Path) -> bool:
    from adapters.tiny import TINY_NAME

    return folder.name == TINY_NAME and (folder / "BUILD_ID").is_file()


def resolve_base(base: str | Path) -> Path:
    """The local folder holding `base` (a folder, the embedded base's name, or a Hugging Face id)."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    from adapters.tiny import TINY_NAME, build_tiny

    if str(base) == TINY_NAME:
        return build_tiny(cache_dir())
    if path.is_absolute() or str(base).startswith((".", "~")) or str(base).count("/") > 1:
        raise FileNotFoundError(f"base model folder not found: {base}")
    from huggingface_hub import snapshot_download

    allow = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    return Path(snapshot_download(str(base), allow_patterns=allow))


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse early (before any work) to replace a non-empty folder unless asked to."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")


@contextmanager
def atomic_output(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_into_place(tmp: Path, target: Path) -> None:
    """Move the finished folder `tmp` to `target`, replacing what was there (renames only)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
