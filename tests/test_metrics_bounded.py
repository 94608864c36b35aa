"""/metrics stays bounded however many adapters serve: histograms for the base model and the busiest
`metrics.histogram_models` adapters, one `__other__` series for the rest; counters per adapter.

The first tests drive `gateway.metrics.Metrics` directly; the last one is a real gateway over HTTP with an
in-memory vLLM (tests/fake_engine.py) and 120 registered adapters, each of which serves.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from gateway.metrics import OTHER, UNKNOWN, Metrics
from gateway.settings import Settings
from tests.conftest import serve_app
from tests.fake_engine import FakeEngineClient, FakeVllm
from tests.registry_helpers import write_adapter

A = "http://engine-a.invalid:8000"


def observe(metrics: Metrics, model: str, route: str = "/v1/chat/completions") -> None:
    metrics.child(metrics.latency, route, metrics.detail(model)).observe(0.5)
    metrics.child(metrics.ttft, metrics.detail(model, count=False)).observe(0.1)
    metrics.child(metrics.requests, route, model, "200").inc()


def histogram_models(text: str, name: str = "lora_gateway_request_duration_seconds") -> set[str]:
    return set(re.findall(rf'^{name}_count\{{[^}}]*model="([^"]+)"', text, re.M))


def counter_models(text: str) -> set[str]:
    return set(re.findall(r'^lora_gateway_requests_total\{[^}]*model="([^"]+)"', text, re.M))


def test_histograms_for_the_busiest_only_counters_for_all() -> None:
    metrics = Metrics(histogram_models=3, rank_every=400)
    metrics.set_fixed({"base"})
    for i in range(200):
        observe(metrics, f"a{i}")
        observe(metrics, "base")
    text = metrics.render().decode()
    assert histogram_models(text) == {"base", "a0", "a1", "a2", OTHER}, "first come while there is room"
    assert len(counter_models(text)) == 201, "counters stay per adapter"
    for _ in range(150):  # traffic moves to three other adapters
        for hot in ("a7", "a8", "a9"):
            observe(metrics, hot)
    text = metrics.render().decode()
    assert histogram_models(text) == {"base", "a7", "a8", "a9", OTHER}, "re-ranked: the old series removed"
    assert histogram_models(text, "lora_gateway_time_to_first_token_seconds") <= {
        "base",
        "a7",
        "a8",
        "a9",
        OTHER,
    }
    assert metrics.detail(UNKNOWN) == UNKNOWN, "made-up names keep their own single series"


def test_a_zero_limit_puts_every_adapter_in_one_series() -> None:
    metrics = Metrics(histogram_models=0)
    metrics.set_fixed({"base"})
    for model in ("a", "b", "base"):
        observe(metrics, model)
    assert histogram_models(metrics.render().decode()) == {"base", OTHER}


@pytest.fixture
def many_adapters(tiny_cache: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    for i in range(120):
        write_adapter(
            tiny_cache["base"], folder / f"ad{i:03d}", seed=1000 + i, rank=4, target_modules=("q_proj",)
        )
    return folder


@pytest.mark.parametrize("limit", [10, 1000], ids=["bounded", "guard-off"])
def test_metrics_of_a_gateway_where_120_adapters_served(
    limit: int, many_adapters: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """With `metrics.histogram_models: 10`, 12 latency series (10 adapters, the base, `__other__`); with
    the guard off (a limit above the number of adapters) one per adapter, as before."""
    settings = Settings(
        cache_dir=cache_dir,
        data_dir=tmp_path / "data",
        adapters_dir=many_adapters,
        engine={"mode": "attached", "url": A, "health_interval_s": 0.05},
        registry={"max_resident": 200},
        metrics={"histogram_models": limit},
    )
    base = settings.base_model_name()
    with (
        serve_app(settings, engine_client=FakeEngineClient({A: FakeVllm(base)})) as url,
        httpx.Client(timeout=30) as http,
    ):
        models = [m["id"] for m in http.get(url + "/v1/models").json()["data"] if "@" not in m["id"]]
        assert len(models) == 121
        for model in models:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            r = http.post(url + "/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
        text = http.get(url + "/metrics").text
    assert len(counter_models(text)) == 121, "every adapter's requests are counted by name"
    series = histogram_models(text)
    if limit >= 120:
        assert len(series) == 121
    else:
        assert base in series and OTHER in series and len(series) == limit + 2, sorted(series)
        assert len(text.splitlines()) < 121 * 25, "less than one histogram's lines per adapter in all"
