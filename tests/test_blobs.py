"""gateway/registry/blobs.py: content addressing, atomic commit, crash leftovers, removal, gc."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapters.validate import AdapterValidationError
from gateway.registry.blobs import BlobStore, manifest_digest

REPO = Path(__file__).resolve().parents[1]


def write_adapter(folder: Path, *, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "seed": seed}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": np.full((8, 256), seed, np.float16),
        f"{prefix}.lora_B.weight": np.zeros((256, 8), np.float16),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(store: BlobStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith("."))


class _WritesFile:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def test_ingest_copies_only_adapter_files(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    (src / "README.md").write_text("# sql\n")
    marker = tmp_path / "pwned"
    (src / "training_args.bin").write_bytes(pickle.dumps(_WritesFile(marker)))
    (src / "handler.py").write_text("import os\n")
    (src / "checkpoint-10").mkdir()
    (src / "checkpoint-10" / "adapter_config.json").write_text("{}")
    store = BlobStore(tmp_path / "data" / "adapters")

    digest, path = store.ingest(src)

    assert path == store.root / digest and store.exists(digest)
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for name in os.listdir(path):
        assert (path / name).read_bytes() == (src / name).read_bytes()
        mode = (path / name).lstat().st_mode
        assert stat.S_ISREG(mode) and not mode & 0o222  # a read-only regular file, not a link
    assert not marker.exists()
    assert leftovers(store) == []


def test_digest_is_sha256_of_the_canonical_manifest(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    digest, _ = BlobStore(tmp_path / "store").ingest(src)
    manifest = "".join(
        f"{sha256(src / name)}  {name}\n"
        for name in sorted(["adapter_config.json", "adapter_model.safetensors"])
    )
    assert digest == hashlib.sha256(manifest.encode()).hexdigest()
    assert digest == manifest_digest({n: sha256(src / n) for n in os.listdir(src)})


def test_same_content_same_digest_wherever_it_comes_from(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    first = store.ingest(write_adapter(tmp_path / "a"))
    os.utime(tmp_path / "a" / "adapter_config.json", (1, 1))
    again = store.ingest(tmp_path / "a")
    elsewhere = store.ingest(write_adapter(tmp_path / "b"))
    other = store.ingest(write_adapter(tmp_path / "c", seed=1))
    assert first == again == elsewhere
    assert other[0] != first[0]
    assert store.list_digests() == sorted([first[0], other[0]])
    assert leftovers(store) == []


def test_digest_of_reads_in_place_what_stage_would_store(tmp_path: Path) -> None:
    """A start that finds its adapters folder unchanged compares digests without copying anything."""
    store = BlobStore(tmp_path / "store")
    src = write_adapter(tmp_path / "src")
    assert store.digest_of(src) == store.stage(src).digest
    assert store.digest_of(write_adapter(tmp_path / "other", seed=1)) != store.digest_of(src)
    assert store.list_digests() == []
    (src / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterValidationError) as err:
        store.digest_of(src)
    assert err.value.code == "missing_file"


def test_symlinked_source_files_are_stored_as_copies(tmp_path: Path) -> None:
    real = write_adapter(tmp_path / "real")
    src = tmp_path / "links"
    src.mkdir()
    for name in os.listdir(real):
        (src / name).symlink_to(real / name)
    digest, path = BlobStore(tmp_path / "store").ingest(src)
    assert not any((path / n).is_symlink() for n in os.listdir(path))
    assert digest == BlobStore(tmp_path / "store2").ingest(real)[0]


def test_stage_validate_commit_and_discard(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    staged = store.stage(write_adapter(tmp_path / "src"))
    assert staged.path.is_dir() and not store.exists(staged.digest)
    assert set(staged.files) == {"adapter_config.json", "adapter_model.safetensors"}
    store.discard(staged)
    assert leftovers(store) == [] and store.list_digests() == []

    staged = store.stage(tmp_path / "src")
    twin = store.stage(tmp_path / "src")
    assert store.commit(staged) == store.commit(twin) == store.path(staged.digest)
    assert leftovers(store) == []


def test_missing_required_file(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    os.unlink(src / "adapter_model.safetensors")
    store = BlobStore(tmp_path / "store")
    with pytest.raises(AdapterValidationError) as info:
        store.ingest(src)
    assert info.value.code == "missing_file"
    assert leftovers(store) == [] and store.list_digests() == []


def test_size_limit_is_enforced_while_copying(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    store = BlobStore(tmp_path / "store")
    with pytest.raises(AdapterValidationError) as info:
        store.ingest(src, max_bytes=2000)
    assert info.value.code == "too_large"
    assert leftovers(store) == [] and store.list_digests() == []
    assert store.ingest(src, max_bytes=10_000)[1].is_dir()


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    os.unlink(src / "adapter_model.safetensors")
    os.mkfifo(src / "adapter_model.safetensors")
    store = BlobStore(tmp_path / "store")
    with pytest.raises(AdapterValidationError) as info:
        store.ingest(src)
    assert info.value.code == "unsafe_file"
    assert leftovers(store) == []


def test_crash_before_rename_leaves_no_blob_and_is_cleaned_up(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    root = tmp_path / "store"
    child = textwrap.dedent(
        """
        import os, sys
        from gateway.registry import blobs
        blobs._fsync_dir = lambda path: os._exit(9)  # dies after the files are written, before the rename
        blobs.BlobStore(sys.argv[1]).ingest(sys.argv[2])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", child, str(root), str(src)], env=env, timeout=60)
    assert proc.returncode == 9

    store = BlobStore(root)
    assert store.list_digests() == []
    (tmp_dir,) = leftovers(store)
    assert tmp_dir.startswith(".tmp-") and len(os.listdir(root / tmp_dir)) == 2
    assert store.cleanup_partial() == 1
    assert leftovers(store) == []
    digest, _ = store.ingest(src)
    assert store.verify(digest)


def test_cleanup_partial_respects_min_age(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    (store.root / ".tmp-inflight").mkdir()
    (store.root / ".trash-old").mkdir()
    os.utime(store.root / ".trash-old", (0, 0))
    assert store.cleanup_partial(min_age_s=3600) == 1
    assert leftovers(store) == [".tmp-inflight"]


def test_remove(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    digest, path = store.ingest(write_adapter(tmp_path / "src"))
    assert store.remove(digest)
    assert not path.exists() and not store.exists(digest)
    assert not store.remove(digest)
    assert leftovers(store) == []


def test_gc_keeps_referenced_and_recent_blobs(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    kept, _ = store.ingest(write_adapter(tmp_path / "a", seed=1))
    old, old_path = store.ingest(write_adapter(tmp_path / "b", seed=2))
    fresh, _ = store.ingest(write_adapter(tmp_path / "c", seed=3))
    os.utime(old_path, (0, 0))
    assert store.gc({kept}, min_age_s=3600) == [old]
    assert store.list_digests() == sorted([kept, fresh])
    assert store.gc({kept}) == [fresh]
    assert store.list_digests() == [kept]


def test_reingest_refreshes_mtime_so_gc_grace_applies(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    digest, path = store.ingest(write_adapter(tmp_path / "a"))
    os.utime(path, (0, 0))
    store.ingest(tmp_path / "a")
    assert store.gc(set(), min_age_s=3600) == []


def test_verify_detects_tampering(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    digest, path = store.ingest(write_adapter(tmp_path / "a"))
    assert store.verify(digest)
    target = path / "adapter_config.json"
    target.chmod(0o644)
    target.write_text("{}")
    assert not store.verify(digest)


@pytest.mark.parametrize("digest", ["../etc", "abc", "A" * 64, "0" * 63 + "/"])
def test_path_rejects_non_digests(tmp_path: Path, digest: str) -> None:
    with pytest.raises(ValueError):
        BlobStore(tmp_path / "store").path(digest)


def test_startup_cleanup_keeps_what_a_live_writer_is_staging(tmp_path: Path) -> None:
    """Several gateways over one shared store start together: one's start-up clean-up must not delete the
    folder another is staging into (it did, and the other crashed with FileNotFoundError). A live writer's
    folder stays; once that writer is gone, the next clean-up removes it."""
    root = tmp_path / "store"
    src = write_adapter(tmp_path / "src")
    BlobStore(root)
    child = textwrap.dedent(
        """
        import sys, time
        from gateway.registry import blobs
        staged = blobs.BlobStore(sys.argv[1]).stage(sys.argv[2])
        print("staged", flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(root), str(src)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "staged"
        store = BlobStore(root)
        (staging,) = leftovers(store)
        assert store.cleanup_partial() == 0, "a live writer's staging folder was deleted"
        assert leftovers(store) == [staging]
        assert store.cleanup_partial(min_age_s=0) == 1  # older than the bound: abandoned whoever wrote it
        (store.root / staging).mkdir()  # as it was
    finally:
        proc.kill()
        proc.wait()
    assert BlobStore(root).cleanup_partial() == 1  # its writer is gone now
    assert leftovers(BlobStore(root)) == []
