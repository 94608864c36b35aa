"""`s3://bucket[/prefix]` sources: an adapter folder in AWS S3 or an S3-compatible store (MinIO, Ceph, ...).

The prefix is a folder (`prefix/`). Of the objects directly under it, only the files the registry stores
(`STORED_FILES`: adapter_config.json, adapter_model.safetensors, README.md) are downloaded, into a fresh
temporary folder (under TMPDIR) that `ResolvedSource.cleanup` removes; nothing else is ever downloaded:
not other files, not nested keys (`prefix/checkpoint-100/adapter_config.json`), so no key names a path
here. An object larger than `max_bytes` (the registry's `registry.max_adapter_bytes`), or objects larger
together, are refused (`too_large`) before anything is downloaded, and a download growing past the cap is
cut short.

Revision: what the registry records, the way it records an hf commit sha, computed from the responses
of the downloads themselves (what was fetched, not what was listed):

    sha256( "".join(sorted(f"{key}={VersionId or ETag}\\n" for each downloaded object)) ).hexdigest()

`key` is the full object key, `VersionId` the object's version when the bucket is versioned (absent, or
"null" for objects written while versioning was off or suspended: then the ETag, without its quotes).
The same objects give the same revision; any object rewritten gives another one (in an unversioned bucket
only if its bytes changed, since the ETag of an object uploaded in one part is its MD5).

Credentials, region and endpoint come from boto3's standard chain, read at each registration (a new
`boto3.session.Session()`): AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE
and the shared config files, container and instance roles; AWS_REGION / AWS_DEFAULT_REGION;
AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an S3-compatible store; AWS_MAX_ATTEMPTS / AWS_RETRY_MODE.
A registration only chooses the bucket and the prefix, never the address called (bucket names are
checked, so that they cannot change the host either). `buckets`, when not empty, is the allowlist.

Errors (`SourceError`): `invalid_source` (malformed URI), `source_not_allowed` (bucket outside the
allowlist), `source_not_found` (no such bucket, nothing under the prefix, no adapter_config.json),
`too_large`, `source_unavailable` (endpoint unreachable, no credentials, credentials refused, any other
S3 error). Blocking (boto3): call through a thread.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from adapters.validate import CONFIG_FILE, STORED_FILES
from gateway.registry.sources import S3_SCHEME, ResolvedSource, SourceError

log = logging.getLogger("lora_gateway.registry.s3")

# S3's bucket naming rules (https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html)
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_RE = re.compile(r"\d+\.\d+\.\d+\.\d+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_MAX_PREFIX = 1024 - 64  # S3 keys are at most 1024 bytes, and the file names are appended
_CHUNK = 1 << 20
# Error codes meaning "these credentials may not do this" (the bucket may well exist).
_REFUSED = {
    "AccessDenied",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
    "403",
}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/team/sql/` -> ("bucket", "team/sql"); `s3://bucket` -> ("bucket", "")."""
    rest = uri[len(S3_SCHEME) :] if uri[: len(S3_SCHEME)].lower() == S3_SCHEME else ""
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.rstrip("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket or _IP_RE.fullmatch(bucket):
        raise SourceError(f"{uri!r} is not s3://bucket/prefix (bucket name).", "invalid_source", "source")
    if prefix and (
        any(p in ("", ".", "..") for p in prefix.split("/"))
        or _CONTROL_RE.search(prefix)
        or len(prefix.encode()) > _MAX_PREFIX
    ):
        raise SourceError(f"{uri!r} has a malformed prefix.", "invalid_source", "source")
    return bucket, prefix


def s3_revision(objects: Iterable[tuple[str, str]]) -> str:
    """The recorded revision of downloaded objects, given as (key, VersionId or ETag) pairs."""
    lines = sorted(f"{key}={tag}\n" for key, tag in objects)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def resolve_s3(
    uri: str, *, buckets: Sequence[str] = (), max_bytes: int | None = None, client: Any = None
) -> ResolvedSource:
    """Download the adapter files under `s3://bucket/prefix/` into a temporary folder (see the module
    docstring); the result's `cleanup` removes it."""
    bucket, prefix = parse_s3_uri(uri)
    recorded = f"{S3_SCHEME}{bucket}" + (f"/{prefix}" if prefix else "")
    if buckets and bucket not in buckets:
        raise SourceError(
            f"Bucket {bucket!r} is not one of registry.s3_buckets.", "source_not_allowed", "source"
        )
    folder_key = f"{prefix}/" if prefix else ""
    s3 = client if client is not None else _client()
    sizes = _list(s3, bucket, folder_key, recorded)
    if CONFIG_FILE not in sizes:
        raise SourceError(f"{recorded} has no {CONFIG_FILE}.", "source_not_found", "source")
    total = 0
    for name, size in sizes.items():
        total += size
        if max_bytes is not None and total > max_bytes:
            what = f"{name} takes {size} bytes" if size > max_bytes else f"the files take {total}+ bytes"
            raise SourceError(f"{recorded}: {what}, more than the {max_bytes} allowed.", "too_large", name)
    tmp = Path(tempfile.mkdtemp(prefix="lora-gateway-s3-"))
    try:
        tags: list[tuple[str, str]] = []
        budget = max_bytes
        for name in sizes:
            tag, size = _download(s3, bucket, folder_key + name, tmp / name, budget, recorded)
            tags.append((folder_key + name, tag))
            budget = None if budget is None else budget - size
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    revision = s3_revision(tags)
    log.info("downloaded %s (%s) into %s", recorded, ", ".join(sizes), tmp)
    return ResolvedSource(
        "s3", tmp, recorded, revision, None, tmp, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)
    )


def _client() -> Any:
    try:
        import boto3  # type: ignore[import-untyped]  # no stubs: the client is used as Any
        from botocore.config import Config  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - boto3 is a dependency
        raise SourceError("s3:// sources need boto3.", "source_unavailable", "source") from None
    config = Config(connect_timeout=10, read_timeout=60, user_agent_extra="lora-gateway")
    try:
        return boto3.session.Session().client("s3", config=config)
    except Exception as exc:  # a malformed AWS config file, an unknown profile, a bad endpoint URL
        raise SourceError(f"S3 is not configured: {exc}", "source_unavailable", "source") from None


def _list(s3: Any, bucket: str, folder_key: str, recorded: str) -> dict[str, int]:
    """The stored files directly under `folder_key`, by name, with their sizes (STORED_FILES order)."""
    found: dict[str, int] = {}
    anything = False
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder_key, Delimiter="/")
        for page in pages:
            anything = anything or bool(page.get("Contents") or page.get("CommonPrefixes"))
            for obj in page.get("Contents", ()):
                name = obj["Key"][len(folder_key) :]
                if name in STORED_FILES:
                    found[name] = int(obj.get("Size", 0))
    except Exception as exc:
        raise _error(exc, recorded) from None
    if not anything:
        raise SourceError(f"{recorded} holds no objects.", "source_not_found", "source")
    return {name: found[name] for name in STORED_FILES if name in found}


def _download(
    s3: Any, bucket: str, key: str, dest: Path, budget: int | None, recorded: str
) -> tuple[str, int]:
    """Write object `key` to `dest`; returns its VersionId (or ETag) and its size."""
    name = dest.name
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
        body = obj["Body"]
        try:
            length = int(obj.get("ContentLength") or 0)
            if budget is not None and length > budget:
                raise SourceError(f"{recorded}: {name} grew past the cap.", "too_large", name)
            size = 0
            with open(dest, "xb") as f:
                for chunk in body.iter_chunks(_CHUNK):
                    size += len(chunk)
                    if budget is not None and size > budget:
                        raise SourceError(f"{recorded}: {name} grew past the cap.", "too_large", name)
                    f.write(chunk)
        finally:
            body.close()
    except SourceError:
        raise
    except Exception as exc:
        raise _error(exc, recorded) from None
    version = obj.get("VersionId")
    tag = version if version and version != "null" else str(obj.get("ETag", "")).strip('"')
    if not tag:
        raise SourceError(f"S3 gave no VersionId or ETag for {key}.", "source_unavailable", "source")
    return tag, size


def _error(exc: Exception, recorded: str) -> SourceError:
    """A boto3/botocore exception -> the SourceError it means."""
    from botocore.exceptions import (  # type: ignore[import-untyped]
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        message = err.get("Message") or code
        if code in ("NoSuchBucket", "NoSuchKey", "404"):
            what = "no such bucket" if code == "NoSuchBucket" else "no such object"
            return SourceError(f"{recorded}: {what}.", "source_not_found", "source")
        if code in _REFUSED:
            return SourceError(
                f"S3 refused the gateway's credentials for {recorded} ({code}: {message}).",
                "source_unavailable",
                "source",
            )
        return SourceError(f"S3 answered {code} for {recorded}: {message}", "source_unavailable", "source")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return SourceError(
            f"No usable AWS credentials for {recorded} (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            f"AWS_PROFILE, or an instance role): {exc}",
            "source_unavailable",
            "source",
        )
    if isinstance(exc, EndpointConnectionError):
        return SourceError(f"The S3 endpoint cannot be reached: {exc}", "source_unavailable", "source")
    log.warning("S3 error for %s", recorded, exc_info=exc)
    return SourceError(f"S3 failed for {recorded}: {exc}", "source_unavailable", "source")
