"""Turn a registration source into a local folder: a path under an allowed root, `hf://org/repo`, or
`s3://bucket/prefix`.

Local paths (absolute, or relative to one of the allowed roots, `file://` prefix optional) are refused
with `source_not_allowed` when they contain `..`, lie outside every root, or when the folder or any
entry inside it is a symlink resolving outside the root. Hard links cannot be told apart and are
trusted: an allowed root is a place only operators write to.

`hf://org/repo[@revision][/subfolder]` (huggingface_hub's own form, the revision URL-encoded:
`refs%2Fpr%2F1`), `hf://org/repo[/subfolder][@revision]` (the older form), or a separate `revision`, is
resolved to a commit sha, which is returned so the registry records exactly what it serves:
- online: `HfApi().model_info(repo, revision=...).sha`, then `snapshot_download(revision=<sha>)` with
  `allow_patterns` limited to the adapter files (a moving branch cannot change between the two calls);
- offline (`HF_HUB_OFFLINE=1`, read at call time): from the cache as huggingface_hub lays it out,
  `<cache>/models--org--repo/refs/<branch or tag>` holding the sha, files under `snapshots/<sha>/`
  linking into `blobs/` (which may link on into the cache-wide `<cache>/blobs/`; any link leaving the
  cache is refused). A full or unique abbreviated sha is accepted as is.

`s3://bucket[/prefix]` (AWS S3 or an S3-compatible store: gateway/registry/s3.py) is downloaded into a
temporary folder, which `ResolvedSource.cleanup` removes, pinned to the objects' version ids or ETags.
Only the endpoint the operator configured (the AWS chain: AWS_ENDPOINT_URL, ...) is ever called, and
`s3_buckets`, when given, limits the buckets.

Any other URL (`http://`, `https://`, `gs://`, ...) is refused with `invalid_source` before anything is
looked up: this module fetches nothing by URL, so a registration cannot make the gateway call an address
an attacker chose (SSRF), and such a string is never read as a relative path either.

Errors are `SourceError` (an `AdapterRefusedError`) with codes `invalid_source`,
`source_not_allowed`, `source_not_found`, `revision_not_found`, `source_unavailable` (Hub or S3
unreachable, credentials refused, and nothing cached), `too_large` (an S3 object over the cap).
Blocking (hub and S3 calls, file walks): call through a thread.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

from adapters.validate import STORED_FILES, AdapterRefusedError

HF_SCHEME = "hf://"
S3_SCHEME = "s3://"
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_RE = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
_REVISION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,255}")
_SHA_RE = re.compile(r"[0-9a-f]{40}")
_SHORT_SHA_RE = re.compile(r"[0-9a-f]{7,39}")
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

log = logging.getLogger("lora_gateway.registry.sources")


class SourceError(AdapterRefusedError):
    """A source cannot be used (see the module docstring for the codes)."""


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "local" | "hf" | "s3"
    path: Path  # folder holding the adapter files
    source: str  # what to record: the absolute path, "hf://org/repo[/subfolder]" or "s3://bucket[/prefix]"
    revision: str | None  # the commit sha for hf, the objects' digest for s3 (s3.py), None for local
    requested_revision: str | None  # what was asked for ("main", a tag, a sha), hf only
    root: Path  # every file under `path` resolves inside this folder
    # Removes what resolving made (s3: the temporary download folder); call it once `path` was copied.
    cleanup: Callable[[], None] | None = field(default=None, compare=False, repr=False)


def resolve_source(
    source: str,
    *,
    revision: str | None = None,
    allowed_roots: Sequence[str | os.PathLike[str]] = (),
    hf_cache_dir: str | os.PathLike[str] | None = None,
    hf_offline: bool | None = None,
    hf_token: str | bool | None = None,
    hf_api: Any = None,
    s3_buckets: Sequence[str] = (),
    max_bytes: int | None = None,
) -> ResolvedSource:
    """Dispatch on the scheme: `hf://...` goes to the Hub (or its cache), `s3://...` to S3 (only the buckets
    in `s3_buckets` when it is not empty; no object over `max_bytes`), `file://` or no scheme is a local
    path, any other URL is refused.

    Call `cleanup` on the result (when set) once its files were copied."""
    scheme = _URL_RE.match(source)
    if scheme and scheme.group(0).lower() not in (HF_SCHEME, S3_SCHEME, "file://"):
        raise SourceError(
            f"{scheme.group(0)} sources are not fetched: register hf://org/repo, s3://bucket/prefix or a "
            "folder under the allowed roots.",
            "invalid_source",
            "source",
        )
    if source.startswith(HF_SCHEME):
        return resolve_hf(
            source, revision, cache_dir=hf_cache_dir, offline=hf_offline, token=hf_token, api=hf_api
        )
    if revision:
        raise SourceError("A revision only applies to hf:// sources.", "invalid_source", "revision")
    if scheme and scheme.group(0).lower() == S3_SCHEME:
        from gateway.registry.s3 import resolve_s3  # boto3 is imported only when S3 is used

        return resolve_s3(source, buckets=s3_buckets, max_bytes=max_bytes)
    return resolve_local(source, allowed_roots)


# -- local ------------------------------------------------------------------------------------


def resolve_local(source: str, allowed_roots: Sequence[str | os.PathLike[str]]) -> ResolvedSource:
    raw = source.removeprefix("file://")
    if not raw or "\x00" in raw:
        raise SourceError("Empty or malformed source path.", "invalid_source", "source")
    if not allowed_roots:
        raise SourceError(
            "Local sources are disabled: no allowed roots configured.", "source_not_allowed", "source"
        )
    given = Path(raw)
    if ".." in given.parts:
        raise SourceError(f"{source!r}: '..' is not allowed in source paths.", "source_not_allowed", "source")
    roots = [(Path(os.path.abspath(r)), Path(os.path.realpath(r))) for r in allowed_roots]
    if given.is_absolute():
        candidates = [Path(os.path.abspath(given))]
        if not any(_within(candidates[0], lex) or _within(candidates[0], real) for lex, real in roots):
            raise SourceError(f"{source!r} is outside the allowed roots.", "source_not_allowed", "source")
    else:
        candidates = [lex / given for lex, _ in roots]
    for candidate in candidates:
        if not os.path.lexists(candidate):
            continue
        real = Path(os.path.realpath(candidate))
        root = next((r for _, r in roots if _within(real, r)), None)
        if root is None:
            raise SourceError(
                f"{source!r} resolves outside the allowed roots.", "source_not_allowed", "source"
            )
        if not real.is_dir():
            raise SourceError(f"{source!r} is not a folder.", "source_not_found", "source")
        check_contained(real, root)
        return ResolvedSource("local", real, str(candidate), None, None, root)
    raise SourceError(f"{source!r} does not exist under the allowed roots.", "source_not_found", "source")


def check_contained(folder: Path, root: Path) -> None:
    """Refuse any symlink under `folder` (at any depth) that resolves outside `root`."""
    root = Path(os.path.realpath(root))
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for entry in (*dirnames, *filenames):
            path = os.path.join(dirpath, entry)
            if os.path.islink(path) and not _within(Path(os.path.realpath(path)), root):
                rel = os.path.relpath(path, folder)
                raise SourceError(f"{rel} links outside the allowed root.", "source_not_allowed", rel)


def _within(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


# -- Hugging Face Hub -------------------------------------------------------------------------


def parse_hf_uri(uri: str) -> tuple[str, str, str | None]:
    """`hf://org/repo@rev/sub/dir` or `hf://org/repo/sub/dir@rev` -> ("org/repo", "sub/dir", "rev").

    When what precedes the first `@` is exactly `org/repo` (huggingface_hub's form), the first segment
    after it is the revision, URL-decoded (huggingface_hub writes `refs/pr/1` as `refs%2Fpr%2F1`), and the
    rest is the subfolder; otherwise (the older form) everything after the `@` is the revision."""
    rest, at, revision = uri.removeprefix(HF_SCHEME).partition("@")
    parts = rest.strip("/").split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    if at and len(parts) == 2:
        encoded, _, subfolder = revision.partition("/")
        revision, subfolder = unquote(encoded), subfolder.strip("/")
    if not _REPO_RE.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise SourceError(f"{uri!r} is not hf://org/repo.", "invalid_source", "source")
    if subfolder and any(p in ("", ".", "..") or "@" in p for p in subfolder.split("/")):
        raise SourceError(f"{uri!r} has a malformed subfolder.", "invalid_source", "source")
    if at:
        _check_revision(revision)
    return repo_id, subfolder, revision if at else None


def _check_revision(revision: str) -> None:
    if not _REVISION_RE.fullmatch(revision) or ".." in PurePosixPath(revision).parts:
        raise SourceError(f"Malformed revision {revision!r}.", "invalid_source", "revision")


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment now (not at import time)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(os.path.expanduser(env))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.environ["HF_HOME"])) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_hf(
    uri: str,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    token: str | bool | None = None,
    api: Any = None,
) -> ResolvedSource:
    """Resolve `hf://org/repo[/sub][@rev]` to a snapshot folder pinned to a commit sha."""
    repo_id, subfolder, uri_revision = parse_hf_uri(uri)
    if revision and uri_revision and revision != uri_revision:
        raise SourceError("Two different revisions given.", "invalid_source", "revision")
    requested = revision or uri_revision or "main"
    _check_revision(requested)
    cache = Path(os.path.realpath(cache_dir if cache_dir is not None else hub_cache_dir()))
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    offline = hub_offline() if offline is None else offline
    sha = None if offline else _sha_from_hub(api, token, repo_id, uri, requested)
    if sha is None:  # offline, or the Hub is unreachable: the cache decides, without network
        try:
            sha = _sha_from_cache(storage, uri, requested)
        except SourceError as exc:
            if offline:
                raise
            msg = f"The Hugging Face Hub could not be reached; {exc.message}"
            raise SourceError(msg, "source_unavailable", "source") from exc
        offline = True
    snapshot = _snapshot(repo_id, uri, sha, subfolder, cache, offline, token)
    folder = snapshot / subfolder if subfolder else snapshot
    if not folder.is_dir():
        raise SourceError(f"{uri} has no folder {subfolder!r} at {sha}.", "source_not_found", "source")
    check_contained(folder, cache)  # repo blobs may link into the cache-wide shared blob store
    recorded = f"{HF_SCHEME}{repo_id}" + (f"/{subfolder}" if subfolder else "")
    return ResolvedSource("hf", folder, recorded, sha, requested, cache)


def _sha_from_cache(storage: Path, uri: str, revision: str) -> str:
    if not storage.is_dir():
        raise SourceError(f"{uri} is not in the local Hugging Face cache.", "source_not_found", "source")
    snapshots = storage / "snapshots"
    if _SHA_RE.fullmatch(revision):
        if (snapshots / revision).is_dir():
            return revision
    else:
        ref = storage / "refs" / revision
        if ref.is_file():
            sha = ref.read_text(encoding="utf-8").strip()
            if _SHA_RE.fullmatch(sha):
                return sha
        elif _SHORT_SHA_RE.fullmatch(revision) and snapshots.is_dir():
            found = [d.name for d in snapshots.iterdir() if d.name.startswith(revision)]
            if len(found) == 1:
                return found[0]
    raise SourceError(
        f"Revision {revision!r} of {uri} is not in the local cache.", "revision_not_found", "revision"
    )


def _sha_from_hub(api: Any, token: str | bool | None, repo_id: str, uri: str, revision: str) -> str | None:
    """The commit sha the Hub gives for `revision`; None when the Hub cannot be reached."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        sha = (api or HfApi(token=token)).model_info(repo_id, revision=revision).sha
    except RevisionNotFoundError:
        raise SourceError(f"{uri} has no revision {revision!r}.", "revision_not_found", "revision") from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"{uri} does not exist (or is private/gated).", "source_not_found", "source"
        ) from None
    except Exception as exc:  # transport errors of whatever HTTP client huggingface_hub uses, 5xx, ...
        log.warning("Hugging Face Hub unreachable for %s (%s); trying the local cache", uri, exc)
        return None
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise SourceError(f"The Hub gave no commit sha for {uri}.", "source_unavailable", "source")
    return sha


def _snapshot(
    repo_id: str, uri: str, sha: str, subfolder: str, cache: Path, offline: bool, token: str | bool | None
) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    prefix = f"{subfolder}/" if subfolder else ""
    try:
        path = huggingface_hub.snapshot_download(
            repo_id,
            revision=sha,
            cache_dir=cache,
            allow_patterns=[prefix + name for name in STORED_FILES],
            local_files_only=offline,
            token=token,
        )
    except RevisionNotFoundError:
        raise SourceError(f"{uri} has no revision {sha}.", "revision_not_found", "revision") from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"{uri} does not exist (or is private/gated).", "source_not_found", "source"
        ) from None
    except LocalEntryNotFoundError as exc:
        raise SourceError(
            f"{uri}@{sha} is not in the local cache: {exc}", "source_not_found", "source"
        ) from None
    except Exception as exc:  # transport errors
        raise SourceError(f"Download of {uri}@{sha} failed: {exc}", "source_unavailable", "source") from exc
    return Path(os.path.realpath(path))
