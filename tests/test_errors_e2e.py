"""Every error a client can meet, with its status and the OpenAI error shape, against real servers.

The engine is the session's real vLLM, except where only a stand-in can produce the condition: an engine
that stays silent (vLLM always answers) and one that dies right after its probe use the project's fast
upstream (`loadtest`'s OpenAI-compatible server) in a process of its own; each such test says so.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI

from tests.conftest import attached_settings, free_port, serve_app, upstream_process
from tests.registry_helpers import held_stream

pytestmark = pytest.mark.engine

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello"}]


def assert_openai_error(
    r: httpx.Response, status: int, code: str | None = None, param: str | None = None
) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] is None or isinstance(error["code"], str)
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI, gateway_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-adapter", messages=MESSAGES)
    assert info.value.status_code == 404
    r = httpx.post(gateway_url + CHAT, json={"model": "no-such-adapter", "messages": MESSAGES})
    error = assert_openai_error(r, 404, "model_not_found", "model")
    assert "no-such-adapter" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES}, "model"),
        ({"model": "demo-a", "messages": []}, "messages"),
        ({"model": "demo-a", "messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"model": "demo-a", "messages": MESSAGES, "temperature": 7}, "temperature"),
        ({"model": "demo-a", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": "demo-a", "messages": [{"content": "no role"}]}, "messages.0.role"),
    ],
)
def test_invalid_fields_are_400_naming_the_field(gateway_url: str, body: dict, param: str) -> None:
    assert_openai_error(httpx.post(gateway_url + CHAT, json=body), 400, "invalid_value", param)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_malformed_json_is_400_not_422(gateway_url: str, raw: bytes) -> None:
    r = httpx.post(gateway_url + CHAT, content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400, "invalid_json")


def test_completions_prompt_is_required(gateway_url: str) -> None:
    r = httpx.post(gateway_url + "/v1/completions", json={"model": "demo-a"})
    assert_openai_error(r, 400, "invalid_value", "prompt")


def test_body_over_the_limit_is_413(gateway_url: str) -> None:
    big = "x" * (9 * 1024 * 1024)  # default limit: 8 MiB
    r = httpx.post(
        gateway_url + CHAT, json={"model": "demo-a", "messages": [{"role": "user", "content": big}]}
    )
    assert_openai_error(r, 413, "payload_too_large")


def test_engine_error_is_passed_through_in_openai_shape(gateway_url: str) -> None:
    # over the tiny model's context (1024), under the gateway's own cap (max_output_tokens, 32768)
    body = {"model": "demo-a", "messages": MESSAGES, "max_tokens": 5000}
    error = assert_openai_error(httpx.post(gateway_url + CHAT, json=body), 400, "400", "max_tokens")
    assert error["type"] == "invalid_request_error"
    assert "max_tokens" in error["message"]


def test_unknown_route_and_method_use_openai_shape(gateway_url: str) -> None:
    assert_openai_error(httpx.get(gateway_url + "/v1/nothing-here"), 404, "not_found")
    assert_openai_error(httpx.get(gateway_url + CHAT), 405, "method_not_allowed")


def test_engine_not_ready_is_503_with_retry_after(cache_dir: Path, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = attached_settings(dead, cache_dir, tmp_path, retry_after_s=7)
    with serve_app(settings, wait_ready=False) as url:
        r = httpx.post(url + CHAT, json={"model": "demo-a", "messages": MESSAGES})
        assert_openai_error(r, 503, "engine_not_ready")
        assert r.headers["retry-after"] == "7"
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.headers["retry-after"] == "7"
        assert health.json()["error"]["code"] == "engine_unavailable"


def test_every_engine_connection_busy_is_503_with_retry_after(
    vllm_url: str, cache_dir: Path, tmp_path: Path, tiny_cache: dict[str, Path]
) -> None:
    """`max_connections` towards the engine all in use for `timeouts.pool_s`: the engine is busy, 503
    `overloaded` with Retry-After (an OpenAI SDK retries it), not 502 "unreachable", and no cool-down: the
    engine stays in rotation and its probes, on a pool of their own, still reach it. One stream whose
    client reads nothing holds the one connection of this gateway's streams' pool to the real vLLM."""
    settings = attached_settings(
        vllm_url,
        cache_dir,
        tmp_path,
        max_connections=1,
        timeouts={"pool_s": 0.5, "connect_s": 0.5},  # aiohttp's bound on the wait is their sum
        retry_after_s=4,
    )
    held = held_stream(tiny_cache) | {"model": "tiny-llama"}
    with (
        serve_app(settings) as url,
        httpx.Client(timeout=60) as http,
        http.stream("POST", url + "/v1/completions", json=held) as stream,
    ):
        assert stream.status_code == 200
        # Streams have their pool (gateway/relay/engine.py), as other inference requests have aiohttp's:
        # a second stream finds the one connection held.
        body = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 2, "stream": True}
        r = httpx.post(url + CHAT, json=body, timeout=60)
        assert_openai_error(r, 503, "overloaded")
        assert r.headers["retry-after"] == "4"
        assert "busy" in r.json()["error"]["message"]
        health = httpx.get(url + "/health", timeout=30)
        assert health.status_code == 200, "probes do not queue behind requests"
        [info] = httpx.get(url + "/admin/engines").json()["data"]
        assert info["state"] == "ready" and not info["cooling_down"]


def test_upstream_read_timeout_is_504(tmp_path: Path, cache_dir: Path) -> None:
    """An engine that accepts the request, then stays silent longer than `timeouts.read_s`: 504.

    The engine is the project's fast upstream told to wait 5 s before answering (the real vLLM
    generates the tiny model's tokens too fast, and too unevenly under load, to stay silent reliably).
    """
    with upstream_process("--ttft-ms", "5000") as upstream:
        settings = attached_settings(upstream.url, cache_dir, tmp_path, timeouts={"read_s": 0.5})
        with serve_app(settings) as url:
            body = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 4}
            r = httpx.post(url + CHAT, json=body, timeout=60)
            assert_openai_error(r, 504, "upstream_timeout")


def test_engine_gone_after_ready_is_502(tmp_path: Path, cache_dir: Path) -> None:
    """An engine that answered its probe, then refuses connections: 502 engine_unreachable.

    The engine here is the project's fast OpenAI-compatible upstream (loadtest/servers/fast_upstream.py), a
    real server in its own process, killed after the gateway saw it ready.
    """
    with upstream_process() as upstream:
        settings = attached_settings(upstream.url, cache_dir, tmp_path, engine={"health_interval_s": 60})
        with serve_app(settings) as url:
            upstream.kill()
            r = httpx.post(url + CHAT, json={"model": "tiny-llama", "messages": MESSAGES})
            assert_openai_error(r, 502, "engine_unreachable")


def test_an_unexpected_crash_is_500_in_openai_shape(cache_dir: Path, tmp_path: Path) -> None:
    """The catch-all handler, as the real app installs it, over real HTTP. No input the gateway accepts is
    known to crash it (that would be a bug to fix), so a stand-in route added to the app raises."""

    def extend(app: FastAPI) -> None:
        @app.post("/v1/crash")
        async def crash() -> None:
            raise RuntimeError("a bug")

    dead = f"http://127.0.0.1:{free_port()}"
    with serve_app(attached_settings(dead, cache_dir, tmp_path), wait_ready=False, extend=extend) as url:
        r = httpx.post(url + "/v1/crash", json={})
        error = assert_openai_error(r, 500, "internal_error")
        assert error["type"] == "server_error" and "a bug" not in r.text and "Traceback" not in r.text
        assert httpx.get(url + "/health").status_code == 503  # and the gateway goes on
