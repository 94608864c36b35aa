"""Tenants over real HTTP with an in-memory vLLM (tests/fake_engine.py): API keys made, rotated and revoked
at runtime, per-key limits and their 429s (local counters; Redis in test_tenants_e2e.py), usage
accounting, the access log and the per-key metrics. The same against the real vLLM and Redis:
tests/test_tenants_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.settings import Settings
from tests.conftest import serve_app
from tests.fake_engine import FakeEngineClient, FakeVllm
from tests.registry_helpers import metric

ENGINE = "http://engine-a.invalid:8000"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


class Gateway:
    def __init__(self, url: str, vllm: FakeVllm, base: str) -> None:
        self.url, self.vllm, self.base = url, vllm, base

    def chat(self, key: str | None, model: str | None = None, **body: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        payload = {"model": model or self.base, "messages": MESSAGES, **body}
        return httpx.post(self.url + CHAT, json=payload, headers=headers, timeout=10)

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, timeout=10, **kw)

    def create(self, name: str, **body: Any) -> str:
        r = self.admin("POST", "/admin/keys", json={"name": name, **body})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])


MakeGateway = Callable[..., Gateway]


@pytest.fixture
def make_gateway(tiny_cache: dict[str, Path], cache_dir: Path, tmp_path: Path) -> Iterator[MakeGateway]:
    with contextlib.ExitStack() as stack:

        def make(data: str = "data", **overrides: Any) -> Gateway:
            engine = {"mode": "attached", "url": ENGINE, "health_interval_s": 0.05}
            settings = Settings(cache_dir=cache_dir, data_dir=tmp_path / data, engine=engine, **overrides)
            base = settings.base_model_name()
            vllm = FakeVllm(base)
            url = stack.enter_context(serve_app(settings, engine_client=FakeEngineClient({ENGINE: vllm})))
            return Gateway(url, vllm, base)

        yield make


def error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert "error" in body, (r.status_code, body)
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


def test_a_key_made_at_runtime_works_at_once_and_only_for_its_models(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    assert gw.chat(None).status_code == 200, "no key exists yet: inference is open"
    secret = gw.create("team-a", models=[gw.base])
    assert secret.startswith("lgw-") and len(secret) > 40
    assert gw.chat(secret).status_code == 200
    r = gw.chat(None)
    assert r.status_code == 401 and error(r)["code"] == "invalid_api_key", "a key exists: keys are required"
    r = gw.chat(secret, "demo-a")
    assert r.status_code == 403 and error(r)["param"] == "model"
    models = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {secret}"}).json()["data"]
    assert [m["id"] for m in models] == [gw.base]

    listed = gw.admin("GET", "/admin/keys").json()["data"]
    assert [(k["name"], k["source"], k["prefix"]) for k in listed] == [("team-a", "api", secret[:8])]
    assert secret not in json.dumps(listed), "the secret is shown once, at creation"
    assert gw.admin("GET", "/admin/keys/team-a").json()["models"] == [gw.base]


def test_revoke_rotate_expire(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    old = gw.create("team-a")
    r = gw.admin("POST", "/admin/keys/team-a/rotate", json={})
    assert r.status_code == 200
    new = r.json()["key"]
    assert new != old and gw.chat(new).status_code == 200
    assert gw.chat(old).status_code == 401, "rotated with no grace: the old secret stops at once"

    graced = gw.admin("POST", "/admin/keys/team-a/rotate", json={"grace_s": 60}).json()["key"]
    assert gw.chat(graced).status_code == 200 and gw.chat(new).status_code == 200, "within the grace period"

    assert gw.admin("DELETE", "/admin/keys/team-a").status_code == 200
    assert gw.chat(graced).status_code == 401 and gw.chat(new).status_code == 401
    assert error(gw.admin("DELETE", "/admin/keys/team-a"))["code"] == "key_not_found"

    soon = gw.create("short", expires_at=time.time() + 1.0)
    assert gw.chat(soon).status_code == 200
    time.sleep(1.1)
    r = gw.chat(soon)
    assert r.status_code == 401 and error(r)["code"] == "api_key_expired"


def test_key_admin_refusals(make_gateway: MakeGateway) -> None:
    gw = make_gateway(auth={"api_keys": [{"key": "from-the-file", "name": "file-key"}]})
    gw.create("team-a")
    cases = [
        ("POST", "/admin/keys", {"name": "team-a"}, 409, "key_exists"),
        ("POST", "/admin/keys", {"name": "file-key"}, 409, "key_in_config"),
        ("POST", "/admin/keys", {"name": "bad name!"}, 400, "invalid_value"),
        ("POST", "/admin/keys", {"name": "x", "limits": {"requests_per_minute": 0}}, 400, "invalid_value"),
        ("POST", "/admin/keys", {"name": "x", "models": []}, 400, "invalid_value"),
        ("POST", "/admin/keys", {"name": "x", "secret": "mine"}, 400, "invalid_value"),
        ("POST", "/admin/keys", {"name": "x", "expires_at": "2001-01-01T00:00:00Z"}, 400, "invalid_value"),
        ("POST", "/admin/keys", {"name": "x", "expires_at": "not a time"}, 400, "invalid_value"),
        ("DELETE", "/admin/keys/file-key", None, 409, "key_in_config"),
        ("PATCH", "/admin/keys/team-a", {}, 400, "invalid_value"),
        ("PATCH", "/admin/keys/nobody", {"models": ["*"]}, 404, "key_not_found"),
        ("POST", "/admin/keys/nobody/rotate", {}, 404, "key_not_found"),
    ]
    for method, path, body, status, code in cases:
        r = gw.admin(method, path, json=body)
        assert (r.status_code, error(r)["code"]) == (status, code), (method, path, body, r.text)
    names = [(k["name"], k["source"]) for k in gw.admin("GET", "/admin/keys").json()["data"]]
    assert names == [("file-key", "config"), ("team-a", "api")], "refusals left nothing half-written"
    r = gw.admin("GET", "/admin/usage", params={"since": "yesterday-ish"})
    assert (r.status_code, error(r)["param"]) == (400, "query.since")
    assert gw.chat("from-the-file").status_code == 200, "config keys keep working beside runtime ones"


@pytest.mark.parametrize("counted", ["here", "redis"])
def test_requests_per_minute_429_with_retry_after(
    make_gateway: MakeGateway, counted: str, request: pytest.FixtureRequest
) -> None:
    limits = {}
    if counted == "redis":
        limits = {"redis_url": request.getfixturevalue("redis_url"), "redis_prefix": f"f{time.time_ns()}:"}
    gw = make_gateway(limits=limits)
    secret = gw.create("team-a", limits={"requests_per_minute": 3})
    if time.time() % 60 > 55:  # the window is a calendar minute: not at its very end
        time.sleep(60 - time.time() % 60 + 0.1)
    assert [gw.chat(secret).status_code for _ in range(3)] == [200, 200, 200]
    r = gw.chat(secret)
    assert r.status_code == 429
    err = error(r)
    assert (err["type"], err["code"], err["param"]) == (
        "requests",
        "rate_limit_exceeded",
        "requests_per_minute",
    )
    assert 1 <= int(r.headers["retry-after"]) <= 60
    # The OpenAI SDK sees its own RateLimitError (and, with retries on, waits Retry-After).
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=gw.base, messages=MESSAGES)  # type: ignore[arg-type]
    other = gw.create("team-b", limits={"requests_per_minute": 3})
    assert gw.chat(other).status_code == 200, "limits are per key"
    assert (
        metric(gw.url, "lora_gateway_key_rate_limited_total", key="team-a", limit="requests_per_minute") == 2
    )


def test_tokens_per_minute_and_max_tokens(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    secret = gw.create("team-a", limits={"tokens_per_minute": 10, "max_tokens": 50})
    if time.time() % 60 > 55:
        time.sleep(60 - time.time() % 60 + 0.1)
    # The fake engine spends 3 prompt + 3 completion tokens per answer.
    assert gw.chat(secret).status_code == 200 and gw.chat(secret).status_code == 200
    r = gw.chat(secret)
    assert r.status_code == 429 and error(r)["type"] == "tokens" and "retry-after" in r.headers
    big = gw.create("team-b", limits={"max_tokens": 50})
    r = gw.chat(big, max_tokens=51)
    assert r.status_code == 400 and error(r)["code"] == "max_tokens_over_key_limit"
    assert error(r)["param"] == "max_tokens"
    assert gw.chat(big).status_code == 200
    assert gw.vllm.requests[-1]["max_tokens"] == 50, "the key's max_tokens is the default of a request"
    assert gw.chat(big, max_tokens=20).status_code == 200 and gw.vllm.requests[-1]["max_tokens"] == 20


def test_update_changes_limits_in_place(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    secret = gw.create("team-a", limits={"requests_per_minute": 1})
    if time.time() % 60 > 55:
        time.sleep(60 - time.time() % 60 + 0.1)
    assert gw.chat(secret).status_code == 200 and gw.chat(secret).status_code == 429
    r = gw.admin("PATCH", "/admin/keys/team-a", json={"limits": {"requests_per_minute": 100}})
    assert r.status_code == 200 and r.json()["limits"]["requests_per_minute"] == 100
    assert gw.chat(secret).status_code == 200, "the same secret, the new limit"


def test_usage_equals_the_responses_usage_and_survives_a_restart(
    make_gateway: MakeGateway, tiny_cache: dict[str, Path], cache_dir: Path, tmp_path: Path
) -> None:
    engine = {"mode": "attached", "url": ENGINE, "health_interval_s": 0.05}
    settings = Settings(cache_dir=cache_dir, data_dir=tmp_path / "data", engine=engine)
    base = settings.base_model_name()
    sent = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    with serve_app(settings, engine_client=FakeEngineClient({ENGINE: FakeVllm(base)})) as url:
        gw = Gateway(url, FakeVllm(base), base)
        secret = gw.create("team-a")
        for i in range(5):
            if i % 2:
                client = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)
                stream = client.chat.completions.create(
                    model=base, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
                )  # type: ignore[call-overload]
                usage = [c.usage for c in stream if c.usage][0]
                got = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
            else:
                got = gw.chat(secret).json()["usage"]
            sent["requests"] += 1
            sent["prompt_tokens"] += got["prompt_tokens"]
            sent["completion_tokens"] += got["completion_tokens"]
        # A stream whose client did not ask for usage still counts (the gateway asked vLLM for it).
        with httpx.stream(
            "POST",
            url + CHAT,
            json={"model": base, "messages": MESSAGES, "stream": True},
            headers={"authorization": f"Bearer {secret}"},
            timeout=10,
        ) as r:
            assert b'"usage"' not in r.read()
        sent["requests"] += 1
        sent["prompt_tokens"] += 3
        sent["completion_tokens"] += 3
        assert gw.chat("lgw-wrong").status_code == 401  # refused: not usage
        rows = httpx.get(url + "/admin/usage", params={"key": "team-a"}).json()["data"]
        assert [(r["key"], r["model"], r["version"]) for r in rows] == [("team-a", base, None)]
        assert {k: rows[0][k] for k in sent} == sent
    # Counted after the last read and written at the clean shutdown: nothing lost.
    with serve_app(settings, engine_client=FakeEngineClient({ENGINE: FakeVllm(base)})) as url:
        rows = httpx.get(url + "/admin/usage", params={"key": "team-a"}).json()["data"]
        assert {k: rows[0][k] for k in sent} == sent


def test_access_log_one_line_per_request_never_the_secret(
    make_gateway: MakeGateway, access_lines: list[dict[str, Any]]
) -> None:
    gw = make_gateway()
    secret = gw.create("team-a", limits={"requests_per_minute": 100})
    ids = []
    for i, (key, model) in enumerate(
        [(secret, None), (None, None), (secret, "no-such-model"), ("lgw-wrong", None), (secret, None)]
    ):
        rid = f"req-{i}"
        ids.append(rid)
        headers = {"x-request-id": rid, **({"authorization": f"Bearer {key}"} if key else {})}
        body = {"model": model or gw.base, "messages": MESSAGES, "stream": i == 4}
        httpx.post(gw.url + CHAT, json=body, headers=headers, timeout=10).read()
    time.sleep(0.2)
    mine = [line for line in access_lines if line["request_id"] in ids]
    assert sorted(line["request_id"] for line in mine) == ids, "exactly one line per request"
    by_id = {line["request_id"]: line for line in mine}
    assert [by_id[i]["status"] for i in ids] == [200, 401, 404, 401, 200]
    ok = by_id["req-0"]
    assert ok["key"] == "team-a" and ok["model"] == gw.base and ok["engine"] == ENGINE
    assert ok["prompt_tokens"] == 3 and ok["completion_tokens"] == 3 and ok["latency_ms"] > 0
    assert ok["ttft_ms"] is None and by_id["req-4"]["ttft_ms"] is not None and by_id["req-4"]["stream"]
    assert by_id["req-2"]["model"] == "__unknown__", "a made-up model name is not logged"
    blob = json.dumps(mine)
    assert secret not in blob and "lgw-wrong" not in blob and "hi" not in blob.replace('"', " ").split()


def test_metrics_per_key(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    secret = gw.create("team-a")
    gw.chat(secret)
    gw.chat(secret)
    assert metric(gw.url, "lora_gateway_key_requests_total", key="team-a", status="200") == 2
    assert metric(gw.url, "lora_gateway_key_tokens_total", key="team-a", kind="completion") == 6
    assert "lgw-" not in httpx.get(gw.url + "/metrics").text


@pytest.mark.parametrize("on_error", ["allow", "deny"])
def test_redis_unreachable(make_gateway: MakeGateway, on_error: str) -> None:
    from loadtest.servers.serving import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    gw = make_gateway(limits={"redis_url": url, "on_redis_error": on_error})
    secret = gw.create("team-a", limits={"requests_per_minute": 1})
    r = gw.chat(secret)
    if on_error == "allow":
        assert r.status_code == 200 and gw.chat(secret).status_code == 200, "served, unlimited"
    else:
        assert (
            r.status_code == 503 and error(r)["code"] == "limiter_unavailable" and "retry-after" in r.headers
        )
    assert gw.chat(gw.create("no-limits")).status_code == 200, "a key without limits never asks Redis"
