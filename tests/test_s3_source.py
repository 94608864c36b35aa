"""gateway/registry/s3.py against a real S3-compatible server on loopback (moto's server, tests/s3_server.py).

The gateway side reads S3 only through boto3's standard environment (AWS_ENDPOINT_URL, fake keys), as it
would against AWS or MinIO; the tests upload with their own client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.validate import STORED_FILES, BaseModelSpec
from gateway.registry.blobs import BlobStore
from gateway.registry.service import Registry, RegistryLimits
from gateway.registry.sources import ResolvedSource, SourceError, resolve_source
from gateway.registry.sqlite import SqliteStore
from loadtest.servers.serving import free_port
from tests.s3_server import new_bucket, require_auth, s3_client, s3_endpoint, s3_env  # noqa: F401
from tests.test_sources import adapter_files
from tests.test_validate import BASE_CONFIG

EXTRA = {
    "training_args.bin": b"\x80\x04pickle",  # never downloaded, so never refused either (as hf:// does)
    "notes.txt": b"not an adapter file",
    "checkpoint-100/adapter_config.json": b"{}",  # nested keys: never downloaded
    "checkpoint-100/adapter_model.safetensors": b"x" * 64,
}


@pytest.fixture
def tmpdir_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the downloads go (TMPDIR), to see that none is left behind."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmpdir_s3: Path) -> Any:  # noqa: F811
    s3_env(monkeypatch, s3_endpoint)
    return s3_client()


def upload(client: Any, bucket: str, prefix: str, files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    return {
        name: client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
        for name, data in files.items()
    }


def expected_revision(lines: dict[str, str]) -> str:
    """The documented recipe (gateway/registry/s3.py), written out again."""
    text = "".join(sorted(f"{key}={tag}\n" for key, tag in lines.items()))
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def resolved() -> Iterator[list[ResolvedSource]]:
    """Resolved sources to clean up after the test (as the registry does after staging)."""
    found: list[ResolvedSource] = []
    yield found
    for src in found:
        if src.cleanup:
            src.cleanup()


def code(info: pytest.ExceptionInfo[SourceError]) -> str:
    return info.value.code


def test_round_trip(s3: Any, tmpdir_s3: Path) -> None:
    bucket = new_bucket(s3)
    files = adapter_files()
    upload(s3, bucket, "team/sql", {**files, **EXTRA})
    src = resolve_source(f"s3://{bucket}/team/sql/", max_bytes=10**6)
    assert (src.kind, src.source, src.requested_revision) == ("s3", f"s3://{bucket}/team/sql", None)
    assert src.root == src.path and src.path.parent == tmpdir_s3
    assert sorted(p.name for p in src.path.iterdir()) == sorted(STORED_FILES)
    for name, data in files.items():
        assert (src.path / name).read_bytes() == data
    etags = {
        f"team/sql/{name}": s3.head_object(Bucket=bucket, Key=f"team/sql/{name}")["ETag"].strip('"')
        for name in files
    }
    assert etags[f"team/sql/{STORED_FILES[1]}"] == hashlib.md5(files[STORED_FILES[1]]).hexdigest()
    assert src.revision == expected_revision(etags)

    again = resolve_source(f"s3://{bucket}/team/sql")
    assert again.revision == src.revision, "the same objects: the same revision"
    upload(s3, bucket, "team/sql", {"README.md": b"# sql, retrained\n"})
    changed = resolve_source(f"s3://{bucket}/team/sql")
    assert changed.revision != src.revision
    assert (changed.path / "README.md").read_bytes() == b"# sql, retrained\n"

    for each in (src, again, changed):
        assert each.cleanup is not None
        each.cleanup()
        assert not each.path.exists()
    assert list(tmpdir_s3.iterdir()) == []


def test_versioned_bucket_records_version_ids(s3: Any, resolved: list[ResolvedSource]) -> None:
    bucket = new_bucket(s3, versioned=True)
    files = adapter_files()
    del files["README.md"]  # optional: what is not there is not in the revision
    puts = upload(s3, bucket, "sql", files)
    versions = {f"sql/{name}": put["VersionId"] for name, put in puts.items()}
    assert all(v and v != "null" for v in versions.values())
    src = resolve_source(f"s3://{bucket}/sql")
    resolved.append(src)
    assert src.revision == expected_revision(versions)
    assert sorted(p.name for p in src.path.iterdir()) == sorted(files)

    # the same bytes uploaded again are a new version, so another revision (the ETags are the same)
    puts = upload(s3, bucket, "sql", {"adapter_config.json": files["adapter_config.json"]})
    versions["sql/adapter_config.json"] = puts["adapter_config.json"]["VersionId"]
    again = resolve_source(f"s3://{bucket}/sql")
    resolved.append(again)
    assert again.revision == expected_revision(versions) != src.revision


def test_bucket_root(s3: Any, resolved: list[ResolvedSource]) -> None:
    bucket = new_bucket(s3)
    for name, data in adapter_files().items():
        s3.put_object(Bucket=bucket, Key=name, Body=data)
    src = resolve_source(f"s3://{bucket}")
    resolved.append(src)
    assert src.source == f"s3://{bucket}" and (src.path / "adapter_config.json").is_file()


def test_not_found(s3: Any, tmpdir_s3: Path) -> None:
    bucket = new_bucket(s3)
    upload(s3, bucket, "team/sql", adapter_files())
    upload(s3, bucket, "team/readme-only", {"README.md": b"x", "sub/adapter_config.json": b"{}"})
    cases = [
        f"s3://no-such-bucket-{bucket}/team/sql",
        f"s3://{bucket}/team/missing",
        f"s3://{bucket}/team/sq",  # a string prefix of team/sql is not the folder
        f"s3://{bucket}/team/sql/adapter_config.json",  # an object, not a folder
        f"s3://{bucket}/team/readme-only",  # no adapter_config.json directly under it
    ]
    for uri in cases:
        with pytest.raises(SourceError) as info:
            resolve_source(uri)
        assert code(info) == "source_not_found", uri
    assert "no such bucket" in str(resolve_error(cases[0]))
    assert list(tmpdir_s3.iterdir()) == []


def resolve_error(uri: str, **kw: Any) -> SourceError:
    with pytest.raises(SourceError) as info:
        resolve_source(uri, **kw)
    return info.value


def test_bucket_allowlist(s3: Any, resolved: list[ResolvedSource]) -> None:
    bucket = new_bucket(s3)
    upload(s3, bucket, "sql", adapter_files())
    err = resolve_error(f"s3://{bucket}/sql", s3_buckets=["models", "other"])
    assert err.code == "source_not_allowed"
    src = resolve_source(f"s3://{bucket}/sql", s3_buckets=["models", bucket])
    resolved.append(src)
    assert src.kind == "s3"


def test_object_over_the_cap_is_refused_before_download(s3: Any, tmpdir_s3: Path) -> None:
    bucket = new_bucket(s3)
    files = adapter_files()
    upload(s3, bucket, "sql", files)
    weights = len(files["adapter_model.safetensors"])
    err = resolve_error(f"s3://{bucket}/sql", max_bytes=weights - 1)
    assert (err.code, err.param) == ("too_large", "adapter_model.safetensors")
    total = sum(len(d) for d in files.values())
    err = resolve_error(f"s3://{bucket}/sql", max_bytes=total - 1)  # each fits, not all of them
    assert err.code == "too_large"
    assert list(tmpdir_s3.iterdir()) == []
    src = resolve_source(f"s3://{bucket}/sql", max_bytes=total)
    assert src.cleanup is not None
    src.cleanup()


def test_endpoint_down(s3: Any, monkeypatch: pytest.MonkeyPatch, tmpdir_s3: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    err = resolve_error("s3://adapters/sql")
    assert err.code == "source_unavailable" and "cannot be reached" in err.message
    assert list(tmpdir_s3.iterdir()) == []


def test_no_credentials(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    err = resolve_error("s3://adapters/sql")
    assert err.code == "source_unavailable" and "credentials" in err.message


def test_credentials_refused(s3: Any, s3_endpoint: str) -> None:  # noqa: F811
    bucket = new_bucket(s3)
    upload(s3, bucket, "sql", adapter_files())
    require_auth(s3_endpoint, True)
    try:
        err = resolve_error(f"s3://{bucket}/sql")
    finally:
        require_auth(s3_endpoint, False)
    assert err.code == "source_unavailable"
    assert "refused the gateway's credentials" in err.message and "InvalidAccessKeyId" in err.message


@pytest.mark.parametrize(
    "uri",
    [
        "s3://",
        "s3:///sql",
        "s3://Adapters/sql",
        "s3://ab/sql",
        "s3://bucket_1/sql",
        "s3://192.168.1.1/sql",
        "s3://bucket/team//sql",
        "s3://bucket/team/../sql",
        "s3://bucket/./sql",
        "s3://bucket/sql\x00",
    ],
)
def test_malformed_uris(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing is called
    assert resolve_error(uri).code == "invalid_source"


def test_revision_is_refused_for_s3() -> None:
    err = resolve_error("s3://adapters/sql", revision="v1")
    assert (err.code, err.param) == ("invalid_source", "revision")


# -- through the registry (no vLLM: the base is described by its config.json) -----------------


def tiny_base(folder: Path) -> BaseModelSpec:
    folder.mkdir()
    config = BASE_CONFIG
    (folder / "config.json").write_text(json.dumps(config))
    return BaseModelSpec.from_model_dir(folder, "tiny-llama")


def test_registry_registers_from_s3_and_removes_the_download(
    s3: Any, tmp_path: Path, tmpdir_s3: Path
) -> None:
    bucket = new_bucket(s3, versioned=True)
    files = adapter_files()
    puts = upload(s3, bucket, "team/sql", {**files, **EXTRA})
    store = SqliteStore(tmp_path / "registry.sqlite3")
    blobs = BlobStore(tmp_path / "adapters")
    limits = RegistryLimits(16, 10**6, (), s3_buckets=(bucket,))
    registry = Registry(store, blobs, tiny_base(tmp_path / "base"), "tiny-llama", limits)
    try:
        version = asyncio.run(registry.register("sql", f"s3://{bucket}/team/sql"))
        assert (version.source, version.rank) == (f"s3://{bucket}/team/sql", 8)
        assert version.revision == expected_revision(
            {f"team/sql/{name}": puts[name]["VersionId"] for name in files}
        )
        stored = blobs.path(version.digest)
        assert sorted(p.name for p in stored.iterdir() if p.name in STORED_FILES) == sorted(STORED_FILES)
        assert (stored / "adapter_model.safetensors").read_bytes() == files["adapter_model.safetensors"]
        assert list(tmpdir_s3.iterdir()) == [], "the download is removed once staged"

        # refused by validation (rank over the limit): the download is removed all the same
        upload(s3, bucket, "team/big", adapter_files(r=32))
        with pytest.raises(Exception, match="rank") as info:
            asyncio.run(registry.register("big", f"s3://{bucket}/team/big"))
        assert getattr(info.value, "code", None) == "rank_too_large"
        assert list(tmpdir_s3.iterdir()) == []

        other = new_bucket(s3)
        upload(s3, other, "sql", files)
        with pytest.raises(SourceError) as refused:
            asyncio.run(registry.register("sql", f"s3://{other}/sql"))
        assert code(refused) == "source_not_allowed"
    finally:
        store.close()
