"""Shutting a gateway down drains it: no new connections, requests in flight run to their end."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import attached_settings, serve_app_server

pytestmark = pytest.mark.engine


def test_in_flight_stream_finishes_during_shutdown(vllm_url: str, cache_dir: Path, tmp_path: Path) -> None:
    settings = attached_settings(vllm_url, cache_dir, tmp_path)
    body = {
        "model": "demo-a",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1000,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    events: list[str] = []
    started = threading.Event()

    with serve_app_server(settings) as (url, server):

        def stream() -> None:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        server.should_exit = True  # what SIGTERM does: stop accepting, let in-flight requests finish
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(url + "/health", timeout=2)
            except (httpx.ConnectError, httpx.ReadError):
                # No new connections: refused, or (racing the listener's close) accepted by the kernel
                # and reset unanswered.
                break
            assert time.monotonic() < deadline, "the gateway kept accepting connections while draining"
            time.sleep(0.05)
        reader.join(timeout=120)
    assert events[-1] == "data: [DONE]", "the stream in flight ran to its end"
    assert sum(e.startswith("data: {") for e in events) > 10
