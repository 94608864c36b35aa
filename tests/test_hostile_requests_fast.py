"""Hostile and faulty traffic against the whole gateway over real HTTP, with an in-memory vLLM behind it
(tests/fake_engine.py): bodies nested to exhaust the parser, requests asking for unbounded work, admin
bodies sent before (or instead of) credentials, engines that list garbage. Each answer is an OpenAI
error, never a 500, and the gateway goes on.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
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


# --- 3. unbounded work, admin bodies ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (COMPLETIONS, {"prompt": ["p"] * 5}, "prompt"),
        (COMPLETIONS, {"prompt": ["p", "q"], "n": 3}, "n"),
        (COMPLETIONS, {"prompt": [[1, 2], [3], [4], [5], [6]]}, "prompt"),
        (CHAT, {"messages": MESSAGES, "n": 5}, "n"),
        (COMPLETIONS, {"prompt": "p", "max_tokens": 101}, "max_tokens"),
        (CHAT, {"messages": MESSAGES, "max_tokens": 101}, "max_tokens"),
        (CHAT, {"messages": MESSAGES, "max_completion_tokens": 101}, "max_completion_tokens"),
    ],
)
def test_requests_over_the_work_caps_are_400_naming_the_field(
    make_gateway: MakeGateway, path: str, body: dict[str, Any], param: str
) -> None:
    gw = make_gateway(max_choices=4, max_output_tokens=100)
    error = error_of(gw.post(path, {"model": "demo-a", **body}), 400, "invalid_value", param)
    assert "at most" in error["message"]
    assert not gw.vllm.requests, "nothing reached the engine"


def test_requests_at_the_work_caps_are_served(make_gateway: MakeGateway) -> None:
    gw = make_gateway(max_choices=4, max_output_tokens=100)
    for path, body in [
        (COMPLETIONS, {"prompt": ["p", "q"], "n": 2, "max_tokens": 100}),
        (COMPLETIONS, {"prompt": [1, 2, 3, 4, 5, 6], "n": 4}),  # one prompt of token ids
        (CHAT, {"messages": MESSAGES, "n": 4, "max_completion_tokens": 100}),
    ]:
        assert gw.post(path, {"model": "demo-a", **body}).status_code == 200
    assert len(gw.vllm.requests) == 3


def test_default_caps(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    r = gw.post(COMPLETIONS, {"model": "demo-a", "prompt": ["p"] * 129})
    error_of(r, 400, "invalid_value", "prompt")
    r = gw.post(CHAT, {"model": "demo-a", "messages": MESSAGES, "max_tokens": 32769})
    error_of(r, 400, "invalid_value", "max_tokens")
    assert gw.post(COMPLETIONS, {"model": "demo-a", "prompt": ["p"] * 128}).status_code == 200


def raw_status(url: str, head: str, timeout: float = 5.0) -> int:
    """Send only a request's head (its body promised by Content-Length, never sent): the status line the
    gateway answers with, or a timeout if it waits for the body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        status_line = sock.makefile("rb").readline().decode()
    return int(status_line.split()[1])


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/admin/adapters"), ("PUT", "/admin/adapters/demo-a/alias")]
)
def test_admin_refuses_before_reading_the_body(make_gateway: MakeGateway, method: str, path: str) -> None:
    gw = make_gateway(auth={"admin_token": ADMIN})
    head = f"{method} {path} HTTP/1.1\nhost: x\ncontent-type: application/json\ncontent-length: 1000000\n"
    assert raw_status(gw.url, head) == 401, "unauthenticated: refused without waiting for the body"
    authed = head + f"authorization: Bearer {ADMIN}\n"
    assert raw_status(gw.url, authed) == 413, "over max_admin_body_bytes: refused from its Content-Length"


def test_admin_bodies_are_capped_and_parsed_like_inference_bodies(make_gateway: MakeGateway) -> None:
    gw = make_gateway(auth={"admin_token": ADMIN}, max_admin_body_bytes=1000)
    auth = {"authorization": f"Bearer {ADMIN}"}

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"name": "x", "source": "'
        yield b"y" * 2000
        yield b'"}'

    r = httpx.post(gw.url + "/admin/adapters", content=chunks(), headers=auth, timeout=10)
    error_of(r, 413, "payload_too_large")
    deep = b'{"name": "x", "source": ' + b"[" * 70 + b"]" * 70 + b"}"
    error = error_of(gw.post("/admin/adapters", content=deep, headers=dict(auth)), 400, "invalid_json")
    assert "nest" in error["message"]
    error_of(gw.post("/admin/adapters", {"source": "/nowhere"}, headers=auth), 400, "invalid_value", "name")
    r = httpx.put(gw.url + "/admin/adapters/demo-a/alias", json={"version": 0}, headers=auth, timeout=10)
    error_of(r, 400, "invalid_value", "version")
    r = httpx.put(gw.url + "/admin/adapters/demo-a/alias", json={"version": 1}, headers=auth, timeout=10)
    assert r.status_code == 200, r.text


# --- 5. who is local --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"x-forwarded-for": "127.0.0.1"},  # uvicorn trusts it from a loopback peer and rewrites the client
        {"x-forwarded-for": "203.0.113.9"},
        {"x-real-ip": "203.0.113.9"},  # nginx's habit; uvicorn ignores it, the peer is the proxy
        {"forwarded": "for=203.0.113.9"},
    ],
    ids=["xff-loopback", "xff-remote", "x-real-ip", "forwarded"],
)
def test_without_a_token_a_relayed_request_is_never_local(
    make_gateway: MakeGateway, headers: dict[str, str]
) -> None:
    """The gateway served as the tests serve it (uvicorn's proxy headers on, trusting loopback) and reached
    through a proxy on the same host: every such request comes from a loopback socket."""
    gw = make_gateway()
    assert httpx.get(gw.url + "/admin/engines", timeout=10).status_code == 200, "a local client"
    r = httpx.get(gw.url + "/admin/engines", headers=headers, timeout=10)
    error_of(r, 403, "admin_loopback_only")


def run_serve(monkeypatch: pytest.MonkeyPatch, *args: str, env: dict[str, str] | None = None) -> Any:
    """`lora-gateway serve ARGS` up to the point where uvicorn would start: (result, uvicorn.run's kwargs)."""
    from typer.testing import CliRunner

    from gateway.cli import app

    for name in ("LORA_GATEWAY_CONFIG", "LORA_GATEWAY_HOST", "LORA_GATEWAY_AUTH__ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    started: list[dict[str, Any]] = []
    monkeypatch.setattr("gateway.app.create_app", lambda settings: settings)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: started.append(kw | {"settings": app}))
    result = CliRunner().invoke(app, ["serve", "--engine-url", "http://127.0.0.1:9", *args])
    return result, started


def test_serve_refuses_a_network_host_without_an_admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    result, started = run_serve(monkeypatch, "--host", "0.0.0.0")
    assert result.exit_code == 2 and not started, result.output
    assert "admin token" in result.output and "--insecure-admin" in result.output
    for args, env in [
        (("--host", "0.0.0.0", "--insecure-admin"), None),
        (("--host", "0.0.0.0"), {"LORA_GATEWAY_AUTH__ADMIN_TOKEN": ADMIN}),
        (("--host", "::1"), None),
        ((), None),  # 127.0.0.1
    ]:
        result, started = run_serve(monkeypatch, *args, env=env)
        assert result.exit_code == 0 and len(started) == 1, (args, result.output)
        assert started[0]["proxy_headers"] is False, "the client address is the socket peer"


# --- 8. an engine that lists garbage ----------------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize(
    "listing",
    [
        [{"id": ["unhashable"], "object": "model", "parent": "base"}],
        [{"object": "model", "parent": "base"}],  # no id
        [{"id": 7, "object": "model", "parent": "base"}],  # not a name
        5,  # not a list
    ],
    ids=["unhashable-id", "no-id", "int-id", "data-not-a-list"],
)
def test_a_malformed_model_listing_is_a_failed_probe_and_the_monitor_goes_on(
    make_gateway: MakeGateway, listing: Any
) -> None:
    gw = make_gateway()

    def state() -> dict[str, Any]:
        [info] = httpx.get(gw.url + "/admin/engines", timeout=10).json()["data"]
        return info  # type: ignore[no-any-return]

    gw.vllm.listing = listing
    wait_for(lambda: state()["state"] == "unavailable", "unhealthy_after bad answers take the engine out")
    assert "bad /v1/models answer" in state()["last_error"]
    probes = gw.vllm.probes
    wait_for(lambda: gw.vllm.probes > probes + 2, "the monitor keeps probing")
    gw.vllm.listing = None
    wait_for(lambda: state()["state"] == "ready", "a good answer brings it back")
    assert gw.post(CHAT, {"model": "demo-a", "messages": MESSAGES}).status_code == 200


# --- no way around the gateway to vLLM -----------------------------------------------------------

# vLLM's own routes beyond the inference ones: adapter loading, tokenizer, pooling, engine control, and the
# Responses API's stored responses (kept in one engine process's memory).
VLLM_ROUTES = [
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/v1/embeddings"),
    ("POST", "/pooling"),
    ("GET", "/v1/responses/resp_1"),
    ("POST", "/v1/responses/resp_1/cancel"),
    ("DELETE", "/v1/responses/resp_1"),
    ("POST", "/invocations"),
    ("POST", "/collective_rpc"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/sleep"),
    ("POST", "/wake_up"),
    ("POST", "/start_profile"),
    ("GET", "/server_info"),
    ("GET", "/load"),
    ("GET", "/version"),
    ("POST", "/v1/completions/../load_lora_adapter"),
    ("POST", "/v1//load_lora_adapter"),
]
KEY = "sk-team-a"


@pytest.mark.parametrize("method,path", VLLM_ROUTES, ids=[p for _, p in VLLM_ROUTES])
def test_the_gateway_never_passes_a_vllm_route_through(
    make_gateway: MakeGateway, method: str, path: str
) -> None:
    """A client with a valid key (and one with the admin token) asks the gateway's port for vLLM's own
    routes: an OpenAI 404 (or 405), and nothing of theirs reaches the engine: the only calls it sees are the
    gateway's own (probes, and loading the pinned adapters from the gateway's blob store)."""
    gw = make_gateway(auth={"admin_token": ADMIN, "api_keys": [{"key": KEY}]})
    wait_for(lambda: any(c[1] == "/v1/models" for c in gw.vllm.calls), "the first probe")
    body = {"lora_name": "evil", "lora_path": "/etc", "prompt": "x", "model": "demo-a"}
    for token in (KEY, ADMIN):
        r = httpx.request(method, gw.url + path, json=body, headers={"authorization": f"Bearer {token}"})
        assert r.status_code in (404, 405), r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    own = {("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"), ("POST", "/v1/load_lora_adapter")}
    calls = gw.vllm.calls
    assert {(m, p) for m, p, _ in calls} <= own, calls
    assert not any("evil" in str(b) or "/etc" in str(b) for _, _, b in calls), calls
    assert "evil" not in gw.vllm.adapters


class _CountingServer(http.server.ThreadingHTTPServer):
    hits = 0


class _Count(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        assert isinstance(self.server, _CountingServer)
        self.server.hits += 1
        self.send_response(200)
        self.end_headers()

    do_HEAD = do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def listener() -> Iterator[_CountingServer]:
    """A real HTTP server on loopback that counts every request made to it."""
    server = _CountingServer(("127.0.0.1", 0), _Count)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_url_source_is_refused_and_never_fetched(
    make_gateway: MakeGateway, listener: _CountingServer
) -> None:
    """SSRF: registration takes `hf://`, `s3://bucket/prefix` (to the endpoint the gateway's AWS settings
    name) or a folder under the allowed roots. A URL naming any other scheme, or an S3 URL naming a host
    (here a listener on loopback, as an attacker would name a metadata service) is 400 `invalid_source`
    before anything is looked up, and nothing ever connects to it."""
    gw = make_gateway(auth={"admin_token": ADMIN})
    host, port = listener.server_address[:2]
    admin = {"authorization": f"Bearer {ADMIN}"}
    for source in (
        f"http://{host}:{port}/adapter",
        f"https://{host}:{port}/adapter",
        f"HTTP://{host}:{port}/adapter",
        f"s3://{host}:{port}/bucket/adapter",
        f"ftp://{host}:{port}/adapter",
    ):
        r = gw.post("/admin/adapters", {"name": "evil", "source": source}, headers=admin)
        error_of(r, 400, "invalid_source", "source")
    error_of(gw.post("/admin/adapters", {"name": "evil", "source": "file:///etc"}, headers=admin), 403,
             "source_not_allowed", "source")  # fmt: skip
    assert listener.hits == 0
    listed = httpx.get(gw.url + "/admin/adapters", headers=admin).json()["data"]
    assert all(a["name"] != "evil" for a in listed), "nothing was half-registered"


def test_a_client_gone_while_its_body_is_read_is_no_crash(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that announces a body and leaves before sending it all (seen when a load test's clients are
    cancelled): no 500 or traceback in the log (it was "unhandled error"), and the gateway goes on."""
    gw = make_gateway()
    host, port = gw.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b'content-length: 1000\r\n\r\n{"model": "tiny'
            )
            time.sleep(0.2)  # the gateway is reading the body
    time.sleep(0.3)
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}
    assert gw.post(COMPLETIONS, body).status_code == 200
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelname == "ERROR"]
