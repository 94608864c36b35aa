"""Who may call what, over real HTTP: the admin token, loopback-only admin without one, API keys with globs.

A client behind a reverse proxy on the same host is never taken for a local one: a relayed request
(`X-Forwarded-For` and the like) is refused without a token (more cases in
tests/test_hostile_requests_fast.py); the pure decision is also checked on a Starlette request.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from starlette.requests import Request

from gateway import auth
from gateway.errors import PermissionDeniedError
from gateway.settings import Settings
from gateway.tenancy.keys import Keyring
from tests.conftest import GatewayProcess, serve_app
from tests.registry_helpers import BASE, complete, register, registry_settings, write_adapter
from tests.test_errors_e2e import assert_openai_error

pytestmark = pytest.mark.engine

ADMIN = "admin-s3cret"
KEYS = [
    {"key": "k-sql", "models": ["sql*"], "name": "sql team"},
    {"key": "k-all", "models": ["*"]},
]


@pytest.fixture(scope="module")
def secured(
    gateway_proc: GatewayProcess, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path_factory
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("auth")
    root = tmp / "src"
    for seed, name in enumerate(["sql-a", "chat-b"]):
        write_adapter(tiny_cache["base"], root / name, seed=500 + seed)
    settings = registry_settings(
        gateway_proc.vllm_url, cache_dir, tmp, root, auth={"admin_token": ADMIN, "api_keys": KEYS}
    )
    with serve_app(settings) as url:
        for name in ["sql-a", "chat-b"]:
            register(url, name, root / name, token=ADMIN)
        yield url


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {ADMIN}"}, {"authorization": "Bearer"}],
    ids=["none", "wrong", "not-bearer", "empty"],
)
def test_admin_needs_the_token(secured: str, headers: dict[str, str]) -> None:
    for method, path in [
        ("GET", "/admin/adapters"),
        ("GET", "/admin/engines"),
        ("DELETE", "/admin/adapters/x"),
    ]:
        r = httpx.request(method, secured + path, headers=headers)
        assert_openai_error(r, 401, "invalid_admin_token")
    r = httpx.post(secured + "/admin/adapters", json={"name": "n", "source": "sql-a"}, headers=headers)
    assert_openai_error(r, 401, "invalid_admin_token")
    assert (
        httpx.get(secured + "/admin/adapters/n", headers={"authorization": f"Bearer {ADMIN}"}).status_code
        == 404
    )


def test_admin_token_works_from_anywhere(secured: str) -> None:
    headers = {"authorization": f"Bearer {ADMIN}", "x-forwarded-for": "203.0.113.9"}
    names = [a["name"] for a in httpx.get(secured + "/admin/adapters", headers=headers).json()["data"]]
    assert names == ["chat-b", "sql-a"]


def test_admin_token_is_compared_in_constant_time() -> None:
    assert "hmac.compare_digest" in inspect.getsource(auth.require_admin)
    # API keys are looked up by their keyed hash: no secret is compared byte by byte at all.
    assert "self.hasher.hash(token)" in inspect.getsource(Keyring.lookup)
    assert "_by_hash.get(" in inspect.getsource(Keyring.lookup)


def test_api_keys_limit_models(secured: str) -> None:
    assert_openai_error(complete(secured, "sql-a"), 401, "invalid_api_key")
    assert_openai_error(complete(secured, "sql-a", key="k-nope"), 401, "invalid_api_key")
    assert_openai_error(complete(secured, "chat-b", key="k-sql"), 403, "model_not_allowed", "model")
    assert_openai_error(complete(secured, BASE, key="k-sql"), 403, "model_not_allowed", "model")
    for model in ["sql-a", "sql-a@1"]:
        assert complete(secured, model, key="k-sql").status_code == 200
    for model in ["chat-b", BASE, "sql-a"]:
        assert complete(secured, model, key="k-all").status_code == 200
    with openai.OpenAI(base_url=secured + "/v1", api_key="k-sql", max_retries=0) as client:
        with pytest.raises(openai.PermissionDeniedError):
            client.completions.create(model="chat-b", prompt="hi", max_tokens=2)
        assert client.completions.create(model="sql-a", prompt="hi", max_tokens=2).model == "sql-a"


def test_models_are_filtered_by_key(secured: str) -> None:
    def ids(key: str | None) -> set[str]:
        r = httpx.get(secured + "/v1/models", headers={"authorization": f"Bearer {key}"} if key else {})
        assert r.status_code == 200, r.text
        return {m["id"] for m in r.json()["data"]}

    assert ids("k-sql") == {"sql-a", "sql-a@1"}
    assert ids("k-all") == {BASE, "sql-a", "sql-a@1", "chat-b", "chat-b@1"}
    assert_openai_error(httpx.get(secured + "/v1/models"), 401, "invalid_api_key")


def test_without_a_token_admin_answers_loopback_clients_only(
    vllm_url: str, cache_dir: Path, tmp_path: Path
) -> None:
    settings = registry_settings(vllm_url, cache_dir, tmp_path, tmp_path)
    with serve_app(settings) as url:
        assert httpx.get(url + "/admin/adapters").status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 200, "no API keys: inference is open"
        # The same request relayed by a reverse proxy on this host for a remote client.
        r = httpx.get(url + "/admin/adapters", headers={"x-forwarded-for": "203.0.113.9"})
        assert_openai_error(r, 403, "admin_loopback_only")


def request_from(host: str, settings: Settings, headers: dict[str, str] | None = None) -> Request:
    app = SimpleNamespace(state=SimpleNamespace(gateway=SimpleNamespace(settings=settings)))
    raw = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "method": "GET", "path": "/admin/adapters", "headers": raw}
    return Request({**scope, "client": (host, 50000), "app": app})


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("localhost", True),
     ("::ffff:127.0.0.1", True), ("10.0.0.2", False), ("203.0.113.9", False), ("2001:db8::1", False),
     ("::ffff:10.0.0.2", False), ("", False)],
)  # fmt: skip
def test_loopback_decision(host: str, allowed: bool) -> None:
    open_admin = Settings()
    request = request_from(host, open_admin)
    assert auth.is_loopback(request) is allowed
    if allowed:
        auth.require_admin(request)
    else:
        with pytest.raises(PermissionDeniedError):
            auth.require_admin(request)
    # With a token configured, only the token counts, wherever the client is.
    with_token = Settings(auth={"admin_token": ADMIN})
    auth.require_admin(request_from(host, with_token, {"authorization": f"Bearer {ADMIN}"}))
