"""Hostile and faulty traffic against the whole gateway over real HTTP, with an in-memory vLLM behind it
(tests/fake_engine.py): bodies nested to exhaust the parser, requests asking for unbounded work, admin
bodies sent before (or instead of) credentials, engines that list garbage. Each answer is an OpenAI
error, never a 500, and the gateway goes on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.settings import Settings
from tests.conftest import serve_app
from tests.fake_engine import FakeEngineClient, FakeVllm

A = "http://engine-a.invalid:8000"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
ADMIN = "admin-s3cret"


class Gateway:
    def __init__(self, url: str, vllm: FakeVllm) -> None:
        self.url = url
        self.vllm = vllm

    def post(self, path: str, body: Any = None, *, content: bytes | None = None, **kw: Any) -> httpx.Response:
        if content is not None:
            kw.setdefault("headers", {})["content-type"] = "application/json"
            return httpx.post(self.url + path, content=content, timeout=10, **kw)
        return httpx.post(self.url + path, json=body, timeout=10, **kw)


MakeGateway = Callable[..., Gateway]


@pytest.fixture
def make_gateway(tiny_cache: dict[str, Path], cache_dir: Path, tmp_path: Path) -> Iterator[MakeGateway]:
    with contextlib.ExitStack() as stack:

        def make(engine: dict[str, Any] | None = None, **overrides: Any) -> Gateway:
            engine = {"mode": "attached", "url": A, "health_interval_s": 0.05, **(engine or {})}
            settings = Settings(cache_dir=cache_dir, data_dir=tmp_path / "data", engine=engine, **overrides)
            vllm = FakeVllm(settings.base_model_name())
            url = stack.enter_context(serve_app(settings, engine_client=FakeEngineClient({A: vllm})))
            return Gateway(url, vllm)

        yield make


def error_of(r: httpx.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


# --- 1. nesting -------------------------------------------------------------------------------------


def test_a_body_nested_past_the_parsers_recursion_is_400_invalid_json(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw = make_gateway()
    raw = b'{"model":"demo-a","messages":' + b"[" * 100_000
    error = error_of(gw.post(CHAT, content=raw), 400, "invalid_json")
    assert "nest" in error["message"]
    closed = b'{"model":"demo-a","messages":' + b"[" * 5000 + b"]" * 5000 + b"}"
    error_of(gw.post(COMPLETIONS, content=closed), 400, "invalid_json")
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelname == "ERROR"]
    assert gw.post(CHAT, {"model": "demo-a", "messages": MESSAGES}).status_code == 200


def test_nesting_deeper_than_the_limit_is_400_and_at_the_limit_is_served(make_gateway: MakeGateway) -> None:
    """The limit is on the JSON's depth (the body object is level 1), wherever the nesting is: here in a
    message's content, which the gateway passes on as sent."""
    from gateway.api.body import MAX_JSON_DEPTH

    gw = make_gateway()

    def content(levels: int) -> Any:
        value: Any = "x"
        for _ in range(levels):
            value = [value]
        return value

    # body {} -> messages [] -> message {} -> content: levels of lists
    at_limit = [{"role": "user", "content": content(MAX_JSON_DEPTH - 3)}]
    assert gw.post(CHAT, {"model": "demo-a", "messages": at_limit}).status_code == 200
    over = [{"role": "user", "content": content(MAX_JSON_DEPTH - 2)}]
    error = error_of(gw.post(CHAT, {"model": "demo-a", "messages": over}), 400, "invalid_json")
    assert str(MAX_JSON_DEPTH) in error["message"]
