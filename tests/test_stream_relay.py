"""How the gateway relays streams, against a real upstream over loopback (the project's fast
upstream standing in for vLLM): a stream that ends by itself is a 200, a client that leaves is a 499
whose upstream connection is closed, and nothing stays counted in flight either way."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
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


def test_streams_that_end_by_themselves_are_200s(tmp_path: Path, cache_dir: Path) -> None:
    with (
        upstream_process() as upstream,
        serve_app(attached_settings(upstream.url, cache_dir, tmp_path)) as url,
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
