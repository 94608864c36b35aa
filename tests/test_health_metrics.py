"""`/health` and `/metrics` as operators and Prometheus see them."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.engine


def samples(url: str) -> list:
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def test_health_is_200_when_the_engine_answers(gateway_url: str) -> None:
    r = httpx.get(gateway_url + "/health")
    assert r.status_code == 200
    assert r.json()["engines"][0]["state"] == "ready" and r.json()["engines"][0]["answers"] is True


def test_metrics_count_requests_errors_latency_per_route_and_model(gateway_url: str) -> None:
    # greedy and never cut short by EOS: exactly 3 completion tokens
    body = {"model": "demo-b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    before = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples(gateway_url)}
    assert httpx.post(gateway_url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    bad = {"model": "demo-b", "messages": []}
    assert httpx.post(gateway_url + "/v1/chat/completions", json=bad).status_code == 400
    after = samples(gateway_url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        now = sum(s.value for s in after if s.name == name and s.labels == labels)
        return now - before.get(key, 0.0)

    route = "/v1/chat/completions"
    assert delta("lora_gateway_requests_total", route=route, model="demo-b", status="200") == 1
    assert delta("lora_gateway_requests_total", route=route, model="demo-b", status="400") == 1
    assert delta("lora_gateway_request_errors_total", route=route, model="demo-b", code="invalid_value") == 1
    assert delta("lora_gateway_request_duration_seconds_count", route=route, model="demo-b") == 2
    assert delta("lora_gateway_completion_tokens_total", model="demo-b") == 3
    assert any(s.name == "lora_gateway_resident_adapters" and s.value >= 2 for s in after)
    assert any(
        s.name == "lora_gateway_adapter_loads_total" and s.labels["adapter"] == "demo-a" for s in after
    )


def test_unknown_model_names_never_become_label_values(gateway_url: str) -> None:
    for i in range(3):
        body = {"model": f"made-up-model-{i}", "messages": [{"role": "user", "content": "x"}]}
        assert httpx.post(gateway_url + "/v1/chat/completions", json=body).status_code == 404
    text = httpx.get(gateway_url + "/metrics").text
    assert "made-up-model" not in text
    models = {s.labels.get("model") for s in samples(gateway_url) if "model" in s.labels}
    assert models <= {"tiny-llama", "demo-a", "demo-b", "__unknown__"}
