"""gateway/registry/sources.py: allowed roots and escapes; a Hugging Face cache laid out as the hub does."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from safetensors.numpy import save

from adapters.validate import BaseModelSpec, validate_adapter_dir
from gateway.registry.blobs import BlobStore
from gateway.registry.sources import SourceError, parse_hf_uri, resolve_hf, resolve_local, resolve_source

OLD = "1" * 40
NEW = "2" * 40
REPO_ID = "acme/sql-lora"
PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "README.md"]


def adapter_files(r: int = 8, readme: str = "# sql\n") -> dict[str, bytes]:
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 16,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": "tiny-llama",
    }
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": np.ones((r, 256), np.float16),
        f"{prefix}.lora_B.weight": np.zeros((256, r), np.float16),
    }
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": save(tensors),
        "README.md": readme.encode(),
    }


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def code(exc_info: pytest.ExceptionInfo[SourceError]) -> str:
    return exc_info.value.code


# -- local roots ------------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    write_folder(allowed / "team" / "sql", adapter_files())
    write_folder(outside / "evil", adapter_files())
    return allowed, outside


def test_relative_and_absolute_paths_inside_a_root(roots: tuple[Path, Path]) -> None:
    allowed, _ = roots
    rel = resolve_local("team/sql", [allowed])
    absolute = resolve_source(str(allowed / "team" / "sql"), allowed_roots=[allowed])
    via_url = resolve_source(f"file://{allowed}/team/sql", allowed_roots=[allowed])
    assert rel.path == absolute.path == via_url.path == (allowed / "team" / "sql").resolve()
    assert (rel.kind, rel.revision, rel.source) == ("local", None, str(allowed / "team" / "sql"))


def test_second_root_is_searched(tmp_path: Path, roots: tuple[Path, Path]) -> None:
    allowed, _ = roots
    other = write_folder(tmp_path / "other" / "chat", adapter_files())
    assert resolve_local("chat", [allowed, tmp_path / "other"]).path == other.resolve()


@pytest.mark.parametrize("source", ["../outside/evil", "team/../../outside/evil", "team/../team/sql"])
def test_dotdot_is_refused(roots: tuple[Path, Path], source: str) -> None:
    allowed, _ = roots
    with pytest.raises(SourceError) as info:
        resolve_local(source, [allowed])
    assert code(info) == "source_not_allowed"
    with pytest.raises(SourceError):
        resolve_local(str(allowed / source), [allowed])


def test_absolute_path_outside_the_roots_is_refused(roots: tuple[Path, Path]) -> None:
    allowed, outside = roots
    for path in [outside / "evil", Path("/etc"), Path("/nonexistent/x")]:
        with pytest.raises(SourceError) as info:
            resolve_local(str(path), [allowed])
        assert code(info) == "source_not_allowed", path


def test_symlinked_folder_escaping_the_root_is_refused(roots: tuple[Path, Path]) -> None:
    allowed, outside = roots
    (allowed / "sneaky").symlink_to(outside / "evil")
    for source in ["sneaky", str(allowed / "sneaky")]:
        with pytest.raises(SourceError) as info:
            resolve_local(source, [allowed])
        assert code(info) == "source_not_allowed"


@pytest.mark.parametrize("inner", ["adapter_model.safetensors", "README.md", "deep/er/x.json", "subdir"])
def test_symlink_inside_the_folder_escaping_the_root_is_refused(roots: tuple[Path, Path], inner: str) -> None:
    allowed, outside = roots
    link = allowed / "team" / "sql" / inner
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists():
        link.unlink()
    link.symlink_to(outside / "evil" / ("adapter_model.safetensors" if inner != "subdir" else ""))
    with pytest.raises(SourceError) as info:
        resolve_local("team/sql", [allowed])
    assert code(info) == "source_not_allowed"
    assert info.value.param == inner


def test_symlinks_staying_inside_the_root_are_fine(roots: tuple[Path, Path]) -> None:
    allowed, _ = roots
    shared = write_folder(allowed / "shared", adapter_files())
    folder = allowed / "linked"
    folder.mkdir()
    for name in PATTERNS:
        (folder / name).symlink_to(shared / name)
    (allowed / "alias").symlink_to(allowed / "team" / "sql")
    assert resolve_local("linked", [allowed]).path == folder.resolve()
    assert resolve_local("alias", [allowed]).path == (allowed / "team" / "sql").resolve()


def test_root_given_through_a_symlink(tmp_path: Path, roots: tuple[Path, Path]) -> None:
    allowed, _ = roots
    (tmp_path / "root-link").symlink_to(allowed)
    assert resolve_local("team/sql", [tmp_path / "root-link"]).path == (allowed / "team" / "sql").resolve()
    assert resolve_local(str(tmp_path / "root-link" / "team" / "sql"), [tmp_path / "root-link"]).path.is_dir()


def test_local_errors(roots: tuple[Path, Path]) -> None:
    allowed, _ = roots
    cases = [
        (lambda: resolve_local("team/missing", [allowed]), "source_not_found"),
        (lambda: resolve_local("team/sql/README.md", [allowed]), "source_not_found"),
        (lambda: resolve_local("team/sql", []), "source_not_allowed"),
        (lambda: resolve_local("", [allowed]), "invalid_source"),
        (lambda: resolve_source("team/sql", revision="main", allowed_roots=[allowed]), "invalid_source"),
        # URLs of any scheme but hf:// and file:// are refused before any lookup (nothing is fetched by URL)
        (lambda: resolve_source("http://169.254.169.254/latest", allowed_roots=[allowed]), "invalid_source"),
        (lambda: resolve_source("gs://bucket/team/sql", allowed_roots=[allowed]), "invalid_source"),
        (lambda: resolve_source("HTTPS://example.com/x", allowed_roots=[allowed]), "invalid_source"),
        (lambda: resolve_source("file:///etc", allowed_roots=[allowed]), "source_not_allowed"),
    ]
    for call, expected in cases:
        with pytest.raises(SourceError) as info:
            call()
        assert code(info) == expected


# -- Hugging Face cache -----------------------------------------------------------------------


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def put_snapshot(
    cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ()
) -> Path:
    """Write files the way huggingface_hub caches them: blobs by git/LFS id, relative snapshot links, refs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for rel, data in files.items():
        blob_id = hashlib.sha256(data).hexdigest() if rel.endswith(".safetensors") else git_blob_id(data)
        blob = repo / "blobs" / blob_id
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no trailing newline, like the hub
    return repo / "snapshots" / commit


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    cache = tmp_path / "hf" / "hub"
    put_snapshot(cache, REPO_ID, OLD, adapter_files(readme="old\n"), refs=("v1",))
    put_snapshot(cache, REPO_ID, NEW, adapter_files(readme="new\n"), refs=("main",))
    return cache


def test_fixture_cache_is_what_huggingface_hub_reads(cache: Path) -> None:
    info = huggingface_hub.scan_cache_dir(cache)
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == REPO_ID
    assert {ref: rev.commit_hash for ref, rev in repo.refs.items()} == {"main": NEW, "v1": OLD}
    path = huggingface_hub.hf_hub_download(
        REPO_ID, "README.md", revision="v1", cache_dir=cache, local_files_only=True
    )
    assert Path(path).read_text() == "old\n"


@pytest.mark.parametrize(
    ("uri", "revision", "sha", "readme"),
    [
        ("hf://acme/sql-lora", None, NEW, "new\n"),
        ("hf://acme/sql-lora", "main", NEW, "new\n"),
        ("hf://acme/sql-lora", "v1", OLD, "old\n"),
        ("hf://acme/sql-lora@v1", None, OLD, "old\n"),
        ("hf://acme/sql-lora", OLD, OLD, "old\n"),
        ("hf://acme/sql-lora", OLD[:7], OLD, "old\n"),
    ],
)
def test_offline_revision_resolves_to_commit_sha(
    cache: Path, uri: str, revision: str | None, sha: str, readme: str
) -> None:
    src = resolve_hf(uri, revision, cache_dir=cache, offline=True)
    assert (src.kind, src.source, src.revision) == ("hf", "hf://acme/sql-lora", sha)
    assert src.requested_revision == (revision or uri.partition("@")[2] or "main")
    assert src.path == (cache / "models--acme--sql-lora" / "snapshots" / sha).resolve()
    assert (src.path / "README.md").read_text() == readme


def test_offline_from_environment(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("offline resolution must not call the Hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    src = resolve_source("hf://acme/sql-lora", revision="main")
    assert src.revision == NEW


def test_offline_errors(cache: Path) -> None:
    cases = [
        ("hf://acme/sql-lora", "no-such-branch", "revision_not_found"),
        ("hf://acme/sql-lora", "3" * 40, "revision_not_found"),
        ("hf://acme/sql-lora", "abcdef0", "revision_not_found"),
        ("hf://acme/other", None, "source_not_found"),
        ("hf://acme", None, "invalid_source"),
        ("hf://acme/sql--lora", None, "invalid_source"),
        ("hf://acme/sql-lora", "../../../etc", "invalid_source"),
        ("hf://acme/sql-lora@v1", "main", "invalid_source"),
        ("hf://acme/sql-lora/../x", None, "invalid_source"),
        ("hf://acme/sql-lora/missing", None, "source_not_found"),
    ]
    for uri, revision, expected in cases:
        with pytest.raises(SourceError) as info:
            resolve_hf(uri, revision, cache_dir=cache, offline=True)
        assert code(info) == expected, (uri, revision)


def test_subfolder(cache: Path) -> None:
    files = {f"sql/{name}": data for name, data in adapter_files().items()}
    put_snapshot(cache, "acme/multi", NEW, {**files, "other/README.md": b"x"}, refs=("main",))
    src = resolve_hf("hf://acme/multi/sql", cache_dir=cache, offline=True)
    assert src.source == "hf://acme/multi/sql" and src.path.name == "sql"
    assert sorted(os.listdir(src.path)) == sorted(PATTERNS)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        # huggingface_hub's form: the revision right after org/repo, then the subfolder
        ("hf://acme/multi@v1/sql", ("acme/multi", "sql", "v1")),
        ("hf://acme/multi@v1/sql/deep/", ("acme/multi", "sql/deep", "v1")),
        ("hf://acme/multi@v1", ("acme/multi", "", "v1")),
        ("hf://acme/multi@v1/", ("acme/multi", "", "v1")),
        ("hf://acme/multi@refs%2Fpr%2F1/sql", ("acme/multi", "sql", "refs/pr/1")),
        (f"hf://acme/multi@{OLD}/sql", ("acme/multi", "sql", OLD)),
        # the older form: the subfolder first, everything after the @ is the revision
        ("hf://acme/multi/sql@v1", ("acme/multi", "sql", "v1")),
        ("hf://acme/multi/sql/deep@refs/pr/1", ("acme/multi", "sql/deep", "refs/pr/1")),
        ("hf://acme/multi/sql", ("acme/multi", "sql", None)),
        ("hf://acme/multi", ("acme/multi", "", None)),
    ],
)
def test_parse_hf_uri_both_forms(uri: str, expected: tuple[str, str, str | None]) -> None:
    assert parse_hf_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "hf://acme/multi@",
        "hf://acme/multi@/sql",
        "hf://acme/multi@v1/../x",
        "hf://acme/multi@v1/a//b",
        "hf://acme/multi@v1/sql@v2",
        "hf://acme/multi@%2E%2E%2F%2E%2E/sql",  # `../..` once decoded
        "hf://acme/multi@v%401/sql",
        "hf://acme/multi/sql@",
    ],
)
def test_parse_hf_uri_refuses_malformed(uri: str) -> None:
    with pytest.raises(SourceError) as info:
        parse_hf_uri(uri)
    assert code(info) == "invalid_source", uri


def test_revision_then_subfolder_resolves_through_the_cache(cache: Path) -> None:
    """`hf://org/repo@rev/sub` and `hf://org/repo/sub@rev` are the same snapshot folder."""
    old = {f"sql/{name}": data for name, data in adapter_files(readme="old\n").items()}
    new = {f"sql/{name}": data for name, data in adapter_files(readme="new\n").items()}
    put_snapshot(cache, "acme/multi", OLD, old, refs=("v1", "refs/pr/1"))
    put_snapshot(cache, "acme/multi", NEW, new, refs=("main",))
    for uri in ["hf://acme/multi@v1/sql", "hf://acme/multi/sql@v1", "hf://acme/multi@refs%2Fpr%2F1/sql"]:
        src = resolve_hf(uri, cache_dir=cache, offline=True)
        assert (src.source, src.revision) == ("hf://acme/multi/sql", OLD), uri
        assert src.path == (cache / "models--acme--multi" / "snapshots" / OLD / "sql").resolve()
        assert (src.path / "README.md").read_text() == "old\n"
    assert resolve_hf("hf://acme/multi@v1/sql", cache_dir=cache, offline=True).requested_revision == "v1"
    pr = resolve_hf("hf://acme/multi@refs%2Fpr%2F1/sql", cache_dir=cache, offline=True)
    assert pr.requested_revision == "refs/pr/1"
    src = resolve_source("hf://acme/multi@main/sql", hf_cache_dir=cache, hf_offline=True)
    assert src.revision == NEW and (src.path / "README.md").read_text() == "new\n"
    with pytest.raises(SourceError) as info:
        resolve_hf("hf://acme/multi@v1/other", cache_dir=cache, offline=True)
    assert code(info) == "source_not_found"
    with pytest.raises(SourceError) as info:
        resolve_hf("hf://acme/multi@v1/sql", "main", cache_dir=cache, offline=True)
    assert code(info) == "invalid_source", "two different revisions"


def test_snapshot_link_leaving_the_cache_is_refused(cache: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    snapshot = cache / "models--acme--sql-lora" / "snapshots" / NEW
    (snapshot / "adapter_config.json").unlink()
    (snapshot / "adapter_config.json").symlink_to(secret)
    with pytest.raises(SourceError) as info:
        resolve_hf("hf://acme/sql-lora", cache_dir=cache, offline=True)
    assert code(info) == "source_not_allowed"


def test_shared_blob_store_links_are_inside_the_cache(cache: Path) -> None:
    """huggingface_hub 1.x+ may link repo blobs on into `<cache>/blobs/<xx>/<hash>`."""
    data = adapter_files()["adapter_model.safetensors"]
    shared = cache / "blobs" / "ab" / ("ab" + "0" * 62)
    shared.parent.mkdir(parents=True)
    shared.write_bytes(data)
    repo_blob = cache / "models--acme--sql-lora" / "blobs" / hashlib.sha256(data).hexdigest()
    repo_blob.unlink()
    repo_blob.symlink_to(os.path.relpath(shared, repo_blob.parent))
    src = resolve_hf("hf://acme/sql-lora", cache_dir=cache, offline=True)
    assert (src.path / "adapter_model.safetensors").read_bytes() == data


def test_resolved_snapshot_validates_and_ingests(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    config = {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "vocab_size": 512,
    }
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    base = BaseModelSpec.from_model_dir(tmp_path / "base", "tiny-llama")
    src = resolve_hf("hf://acme/sql-lora", "v1", cache_dir=cache, offline=True)
    assert validate_adapter_dir(src.path, base, max_rank=16, max_bytes=10**6).rank == 8
    digest, path = BlobStore(tmp_path / "store").ingest(src.path)
    assert not (path / "README.md").is_symlink() and (path / "README.md").read_text() == "old\n"


# -- Hugging Face online (the Hub itself is replaced: no network in tests) --------------------


class FakeApi:
    def __init__(self, result: object) -> None:
        self.result = result
        self.calls: list[tuple[str, str | None]] = []

    def model_info(self, repo_id: str, *, revision: str | None = None) -> SimpleNamespace:
        self.calls.append((repo_id, revision))
        if isinstance(self.result, BaseException):
            raise self.result
        return SimpleNamespace(sha=self.result)


def bare(cls: type[BaseException]) -> BaseException:
    """A hub error without an HTTP response object (only its type matters here)."""
    err = cls.__new__(cls)
    err.args = ("from the fake hub",)
    return err


def test_online_branch_resolved_with_model_info_then_downloaded_by_sha(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    downloads: list[dict] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        downloads.append({"repo_id": repo_id, **kwargs})
        return str(cache / "models--acme--sql-lora" / "snapshots" / str(kwargs["revision"]))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    api = FakeApi(OLD)  # the Hub says main is at OLD now, whatever the cache's refs/main says
    src = resolve_hf("hf://acme/sql-lora", "main", cache_dir=cache, offline=False, api=api)
    assert api.calls == [(REPO_ID, "main")]
    assert src.revision == OLD and (src.path / "README.md").read_text() == "old\n"
    (call,) = downloads
    assert call["revision"] == OLD and call["local_files_only"] is False
    assert sorted(call["allow_patterns"]) == sorted(PATTERNS)


@pytest.mark.parametrize(
    ("error", "expected"),
    [(RevisionNotFoundError, "revision_not_found"), (RepositoryNotFoundError, "source_not_found")],
)
def test_online_not_found(cache: Path, error: type[BaseException], expected: str) -> None:
    with pytest.raises(SourceError) as info:
        resolve_hf("hf://acme/sql-lora", "main", cache_dir=cache, offline=False, api=FakeApi(bare(error)))
    assert code(info) == expected


def test_unreachable_hub_falls_back_to_the_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_stay_local(repo_id: str, **kwargs: object) -> str:
        assert kwargs["local_files_only"] is True
        return real(repo_id, **kwargs)

    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", must_stay_local)
    api = FakeApi(ConnectionError("no route to host"))
    assert resolve_hf("hf://acme/sql-lora", "v1", cache_dir=cache, offline=False, api=api).revision == OLD
    with pytest.raises(SourceError) as info:
        resolve_hf("hf://acme/sql-lora", "nope", cache_dir=cache, offline=False, api=api)
    assert code(info) == "source_unavailable"
