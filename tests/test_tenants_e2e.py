"""Many teams on one deployment, end to end: the real vLLM, two gateways on one PostgreSQL registry and one
real Redis (`redis-server`, started by the tests), the official OpenAI SDK.

- a key made through one gateway's admin API works at once there, and on the other gateway within its
  poll interval, and only for its models;
- two gateways on one Redis enforce one shared requests-per-minute limit (429 with Retry-After, which the
  OpenAI SDK honours);
- a revoked key fails on every gateway;
- the usage totals equal the sum of `usage` in the responses (streams included);
- the access log has exactly one line per request.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import serve_app
from tests.pg import new_database
from tests.registry_helpers import PROMPT, register, registry_settings, write_adapter

pytestmark = pytest.mark.engine

RPM = 6
POLL_S = 0.3


def body(model: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True, **kw}


def post(url: str, secret: str | None, payload: dict[str, Any], rid: str) -> httpx.Response:
    headers = {"x-request-id": rid, **({"authorization": f"Bearer {secret}"} if secret else {})}
    return httpx.post(url + "/v1/completions", json=payload, headers=headers, timeout=120)


def knows(url: str, secret: str) -> bool:
    """Has the gateway at `url` read the key (and the adapter registered before it) from the registry?"""
    r = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {secret}"})
    return r.status_code == 200 and "t-sql" in [m["id"] for m in r.json()["data"]]


def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


def test_keys_limits_usage_and_access_log_across_two_gateways(
    postgres_url: str,
    redis_url: str,
    vllm_url: str,
    cache_dir: Path,
    tiny_cache: dict[str, Path],
    tmp_path: Path,
    access_lines: list[dict[str, Any]],
) -> None:
    database = new_database(postgres_url)
    root = tmp_path / "src"
    write_adapter(tiny_cache["base"], root / "t-sql", seed=8100)
    prefix = f"t{time.time_ns()}:"  # both gateways count in the same keys

    def settings(name: str):  # noqa: ANN202
        registry = {"url": database, "store_dir": str(tmp_path / "store"), "poll_interval_s": POLL_S}
        return registry_settings(
            vllm_url,
            cache_dir,
            tmp_path / name,
            root,
            registry=registry,
            auth={"admin_token": "adm"},
            limits={"redis_url": redis_url, "redis_prefix": prefix},
        )

    admin = {"authorization": "Bearer adm"}
    sent: list[tuple[str, str]] = []  # (gateway url, request id) of every inference request
    usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def send(url: str, secret: str | None, payload: dict[str, Any]) -> httpx.Response:
        rid = f"t-{len(sent)}"
        sent.append((url, rid))
        r = post(url, secret, payload, rid)
        if r.status_code == 200:
            usage["requests"] += 1
            usage["prompt_tokens"] += r.json()["usage"]["prompt_tokens"]
            usage["completion_tokens"] += r.json()["usage"]["completion_tokens"]
        return r

    with serve_app(settings("a")) as a, serve_app(settings("b")) as b:
        register(a, "t-sql", root / "t-sql", token="adm")
        base = httpx.get(a + "/v1/models").json()["data"][0]["id"]
        r = httpx.post(
            a + "/admin/keys",
            json={"name": "team-sql", "models": ["t-sql"], "limits": {"requests_per_minute": RPM}},
            headers=admin,
        )
        assert r.status_code == 201, r.text
        secret = r.json()["key"]
        if time.time() % 60 > 40:  # one calendar minute for the whole limited part
            time.sleep(60 - time.time() % 60 + 0.2)

        # Works at once on the gateway that made it, only for its models.
        assert send(a, secret, body("t-sql")).status_code == 200
        r = send(a, secret, body(base))
        assert r.status_code == 403 and r.json()["error"]["param"] == "model"
        # The other gateway learns of it within its poll interval.
        until(lambda: knows(b, secret))
        assert send(b, secret, body("t-sql")).status_code == 200

        # One shared limit: RPM per minute across both gateways (2 used above).
        statuses = [send((a, b)[i % 2], secret, body("t-sql")) for i in range(RPM)]
        codes = [r.status_code for r in statuses]
        assert codes.count(200) == RPM - 2 and codes.count(429) == 2, codes
        for r in statuses:
            if r.status_code == 429:
                assert 1 <= int(r.headers["retry-after"]) <= 60
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        client = openai.OpenAI(base_url=b + "/v1", api_key=secret, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="t-sql", prompt=PROMPT, max_tokens=2)
        sent.append((b, "sdk"))  # the SDK's request: one more access line, its own request id

        # A second key, no limits, streams through the SDK: usage from the stream's usage event.
        r = httpx.post(a + "/admin/keys", json={"name": "team-all"}, headers=admin)
        other = r.json()["key"]
        until(lambda: knows(b, other))
        for url in (a, b):
            sdk = openai.OpenAI(base_url=url + "/v1", api_key=other, max_retries=0)
            stream = sdk.completions.create(
                model="t-sql",
                prompt=PROMPT,
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"x-request-id": f"s-{url[-5:]}"},
            )
            [u] = [c.usage for c in stream if c.usage]
            sent.append((url, f"s-{url[-5:]}"))
            usage["requests"] += 1
            usage["prompt_tokens"] += u.prompt_tokens
            usage["completion_tokens"] += u.completion_tokens

        # Revoked on one gateway: refused there at once, and on the other within its poll interval.
        assert httpx.delete(a + "/admin/keys/team-sql", headers=admin).status_code == 200
        assert send(a, secret, body("t-sql")).status_code == 401
        until(lambda: post(b, secret, body("t-sql"), "poll").status_code == 401, timeout=5 * POLL_S + 5)
        assert send(b, secret, body("t-sql")).status_code == 401

        # Usage: what both gateways counted, read from either (each writes its own counts).
        for url in (a, b):
            httpx.get(url + "/admin/usage", headers=admin)  # flushes that gateway's counts
        rows = httpx.get(b + "/admin/usage", headers=admin).json()["data"]
        totals = {k: sum(r[k] for r in rows) for k in usage}
        assert totals == usage, (rows, usage)
        assert {(r["key"], r["model"], r["version"]) for r in rows} == {
            ("team-sql", "t-sql", 1),
            ("team-all", "t-sql", 1),
        }

    # One access line per request: the polls included ("poll" ids, any number), every other id exactly once.
    ids = [line["request_id"] for line in access_lines]
    for _, rid in sent:
        if rid == "sdk":
            continue
        assert ids.count(rid) == 1, (rid, ids.count(rid))
    assert all("lgw-" not in json.dumps(line) for line in access_lines)
    statuses_logged = [line["status"] for line in access_lines if line["request_id"].startswith("t-")]
    assert statuses_logged.count(429) == 2
