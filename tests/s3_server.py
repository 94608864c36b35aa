"""A real S3-compatible server for the tests (moto's standalone server), started once per session on loopback.

- `s3_endpoint` (session fixture): `http://127.0.0.1:<port>`, moto's server (`moto.server.ThreadedMotoServer`,
  the same server `moto_server` runs) in a daemon thread of the test process, speaking S3's HTTP API;
  its buckets live in memory and go with the session. Tests share it: each makes buckets of its own
  (`new_bucket`), so none sees another's objects.
- `s3_env(monkeypatch, endpoint)`: the environment a gateway reads S3 through (boto3's standard chain),
  pointed at that server with fake credentials; nothing from the machine's own AWS set-up leaks in.
- `s3_client()`: a boto3 client for that environment, for the tests' own uploads.
- `require_auth(endpoint, on)`: make the server check credentials (they are fake: every request is then
  refused with InvalidAccessKeyId), through moto's own `/moto-api/reset-auth`.

moto comes with the `dev` extra (`make setup`); it missing is a failure, not a skip.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

MISSING = "moto[server] is not installed: `make setup` installs the dev extra (pyproject.toml)."

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_MAX_ATTEMPTS": "1",  # a refused connection fails at once, not after retries with back-off
}
UNSET = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_ENDPOINT_URL_S3",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_RETRY_MODE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        pytest.fail(MISSING, pytrace=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        r = httpx.get(endpoint + "/moto-api/data.json", timeout=10)  # it answers HTTP, not only listens
        assert r.status_code == 200, r.text
        yield endpoint
    finally:
        server.stop()


def s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in FAKE_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)


def s3_client() -> Any:
    import boto3

    return boto3.session.Session().client("s3")


def new_bucket(client: Any, *, versioned: bool = False) -> str:
    name = f"adapters-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    if versioned:
        client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def require_auth(endpoint: str, on: bool) -> None:
    """Credentials checked from the next request on (`on`), or never again (moto's default)."""
    r = httpx.post(endpoint + "/moto-api/reset-auth", content=b"0" if on else b"inf", timeout=10)
    assert r.status_code == 200, r.text
