"""How the gateway relays streams, against a real upstream over loopback (the project's fast
upstream standing in for vLLM): a stream that ends by itself is a 200, a client that leaves is a 499
whose upstream connection is closed (within 100 ms for a non-streaming client, against an engine that
never answers), and nothing stays counted in flight either way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import attached_settings, serve_app, upstream_process

CHAT = "/v1/chat/completions"


def counts(url: str) -> dict[tuple[str, str], float]:
    """(metric sample name, status or code) -> value, for the base model's series."""
    text = httpx.get(url + "/metrics").text
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") == "tiny-llama":
                key = (s.name, s.labels.get("status") or s.labels.get("code") or "")
                out[key] = out.get(key, 0.0) + s.value
    return out


@pytest.mark.parametrize("relay", ["socket", "asgi"])
def test_streams_that_end_by_themselves_are_200s(tmp_path: Path, cache_dir: Path, relay: str) -> None:
    """Both relays (`stream_relay`): at the protocol level, and through aiohttp and ASGI messages."""
    with (
        upstream_process() as upstream,
        serve_app(attached_settings(upstream.url, cache_dir, tmp_path, stream_relay=relay)) as url,
    ):
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(40):
                r = client.post(CHAT, json={**body, "max_tokens": 6})
                assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        c = counts(url)
    assert c[("lora_gateway_requests_total", "200")] == 40
    assert ("lora_gateway_requests_total", "499") not in c
    assert c[("lora_gateway_requests_in_flight", "")] == 0


def test_a_client_leaving_mid_stream_is_a_499_and_frees_its_slot(tmp_path: Path, cache_dir: Path) -> None:
    with (
        upstream_process("--itl-ms", "50") as upstream,
        serve_app(attached_settings(upstream.url, cache_dir, tmp_path)) as url,
    ):
        body = {
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 200,  # 10 s at 50 ms a token: the client leaves long before
        }
        with httpx.stream("POST", url + CHAT, json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
        # The gateway notices the departure and closes its side; give it a moment.
        for _ in range(100):
            c = counts(url)
            if c.get(("lora_gateway_requests_total", "499")) == 1:
                break
            time.sleep(0.05)
        assert c.get(("lora_gateway_requests_total", "499")) == 1, c
        assert c[("lora_gateway_request_errors_total", "client_disconnected")] == 1
        assert c[("lora_gateway_requests_in_flight", "")] == 0
        assert ("lora_gateway_requests_total", "200") not in c


class _Hanging(asyncio.Protocol):
    """An engine that answers probes and never answers a completion; it notes when the gateway hangs up."""

    def __init__(self, seen: dict[str, float]) -> None:
        self.seen = seen
        self.data = b""
        self.completion = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        head, sep, _ = self.data.partition(b"\r\n\r\n")
        if not sep:
            return
        if head.startswith(b"POST /v1/completions"):
            self.completion = True
            self.seen["request"] = time.monotonic()
            return
        body = b'{"object":"list","data":[{"id":"tiny-llama","object":"model","parent":null}]}'
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
        self.transport.write(b"content-length: %d\r\n\r\n%s" % (len(body), body))
        self.data = b""

    def connection_lost(self, exc: Exception | None) -> None:
        if self.completion:
            self.seen["closed"] = time.monotonic()


@contextlib.contextmanager
def loopback_engine(
    protocol: type[_Hanging] | None = None,
) -> Iterator[tuple[str, dict[str, float]]]:
    """An engine played by `protocol` (default `_Hanging`) on a loopback port, on a loop in a thread."""
    seen: dict[str, float] = {}
    make = protocol or _Hanging
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(lambda: make(seen), "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()
        loop.close()


def test_a_non_streaming_client_leaving_drops_the_engine_call_within_100_ms(
    tmp_path: Path, cache_dir: Path
) -> None:
    """Nothing reaches a non-streaming client before the engine has answered. One that leaves meanwhile
    (a client timeout) makes the gateway hang up on the engine (vLLM then aborts the request; measured
    against the real vLLM in tests/test_streaming_disconnect.py) within 100 ms of the client's close."""
    with (
        loopback_engine() as (engine_url, seen),
        serve_app(
            attached_settings(engine_url, cache_dir, tmp_path, engine={"health_interval_s": 30})
        ) as url,
    ):
        host, port = url.removeprefix("http://").split(":")
        data = json.dumps({"model": "tiny-llama", "prompt": "hi", "max_tokens": 900}).encode()
        for _ in range(5):
            seen.clear()
            with socket.create_connection((host, int(port))) as sock:
                head = f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                sock.sendall(head.encode() + f"content-length: {len(data)}\r\n\r\n".encode() + data)
                deadline = time.monotonic() + 10
                while "request" not in seen:
                    assert time.monotonic() < deadline, "the engine never got the request"
                    time.sleep(0.005)
                time.sleep(0.05)
            left = time.monotonic()
            while "closed" not in seen:
                assert time.monotonic() - left < 5, "the gateway kept its engine call after the client left"
                time.sleep(0.001)
            took = seen["closed"] - left
            assert took < 0.1, f"the engine call was dropped {1000 * took:.0f} ms after the client left"
        for _ in range(100):
            if counts(url).get(("lora_gateway_requests_total", "499")) == 5:
                break
            time.sleep(0.05)
        assert counts(url).get(("lora_gateway_requests_total", "499")) == 5, counts(url)
        assert counts(url)[("lora_gateway_requests_in_flight", "")] == 0


class _DiesMidEvent(_Hanging):
    """An engine that streams one whole event and half of the next, then its connection drops (vLLM killed
    mid-write): the half event must not reach the client glued to the error event (it did, on the socket
    relay: `data: {"id": ... "mod{"error": ...}`, seen in tests/test_engine_restart.py)."""

    def data_received(self, data: bytes) -> None:
        self.data += data
        head, sep, _ = self.data.partition(b"\r\n\r\n")
        if sep and head.startswith(b"POST /v1/chat/completions"):
            event = (
                b'data: {"id":"c1","object":"chat.completion.chunk","model":"tiny-llama","choices":[]}\n\n'
            )
            half = b'data: {"id":"c1","object":"chat.completion.chunk","mod'
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
            self.transport.write(b"transfer-encoding: chunked\r\n\r\n")
            for part in (event, half):
                self.transport.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0"
            )
            self.transport.abort()
            return
        super().data_received(data)


@pytest.mark.parametrize("relay", ["socket", "asgi"])
def test_an_engine_dying_mid_event_ends_the_stream_with_whole_events_only(
    tmp_path: Path, cache_dir: Path, relay: str
) -> None:
    with loopback_engine(_DiesMidEvent) as (engine_url, _):
        settings = attached_settings(engine_url, cache_dir, tmp_path, stream_relay=relay)
        with serve_app(settings) as url:
            body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            r = httpx.post(url + CHAT, json=body, timeout=30)
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e.strip()]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events]  # each one whole JSON
    assert payloads[0]["object"] == "chat.completion.chunk"
    assert payloads[-1]["error"]["code"] == "upstream_error", payloads[-1]
    assert len(payloads) == 2, events
