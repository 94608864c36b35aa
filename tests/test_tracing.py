"""OpenTelemetry traces (gateway/tracing.py) through the real SDK and its OTLP/HTTP exporter, into a real
receiver on loopback (tests/otlp_receiver.py): off unless configured; a span per request with children for
resolve, lease and upstream; the client's `traceparent` continued; the engine given the upstream span's."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import httpx
import pytest

from gateway.settings import Settings
from gateway.tracing import configure_tracing
from tests.conftest import serve_app
from tests.fake_engine import FakeEngineClient, FakeVllm
from tests.otlp_receiver import Receiver, Span, otlp_receiver

ENGINE = "http://engine-a.invalid:8000"
INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with otlp_receiver() as r:
        yield r


def env_for(receiver: Receiver) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_SERVICE_NAME": "gw-under-test",
    }


OTEL_VARIABLES = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_SDK_DISABLED",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
)


def setenv(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]) -> None:
    """Exactly `environ`'s OTEL_* variables (the SDK reads os.environ)."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)


def wait_spans(receiver: Receiver, count: int, timeout: float = 10) -> list[Span]:
    deadline = time.monotonic() + timeout
    while len(receiver.spans()) < count:
        assert time.monotonic() < deadline, f"{len(receiver.spans())} spans, wanted {count}"
        time.sleep(0.05)
    return receiver.spans()


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"},
    ],
)
def test_off_unless_configured(environ: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    setenv(monkeypatch, environ)
    assert configure_tracing() is None


def test_unknown_exporter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    setenv(monkeypatch, {"OTEL_TRACES_EXPORTER": "zipkin-ish"})
    with pytest.raises(ValueError, match="unknown exporter"):
        configure_tracing()


def test_console_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    setenv(monkeypatch, {"OTEL_TRACES_EXPORTER": "console"})
    out = io.StringIO()
    with redirect_stdout(out):
        tracing = configure_tracing()
        assert tracing is not None
        tracing.start_request("/v1/completions", {}).end(200, None)
        tracing.shutdown()
    assert "POST /v1/completions" in out.getvalue()


def test_request_span_children_and_propagation(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    setenv(monkeypatch, env_for(receiver))
    tracing = configure_tracing()
    assert tracing is not None
    incoming = {"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"}
    request = tracing.start_request("/v1/chat/completions", incoming)
    with request.child("resolve"):
        pass
    lease = request.start_child("lease")
    lease.end()
    upstream = request.start_child("upstream")
    header = upstream.traceparent()["traceparent"]
    upstream.end()
    upstream.end()  # twice: one span
    request.set(**{"lora_gateway.key": "team-a", "lora_gateway.adapter_version": None})
    request.end(200, None)
    request.end(500, "again")  # ignored: ended once
    failed = tracing.start_request("/v1/completions", {})
    failed.end(502, "upstream_error")
    not_found = tracing.start_request("/v1/completions", {})
    not_found.end(404, "model_not_found")
    tracing.shutdown()
    spans = {s.name: s for s in wait_spans(receiver, 6)}
    assert len(receiver.spans()) == 6
    root = spans["POST /v1/chat/completions"]
    assert root.trace_id == INCOMING_TRACE and root.parent_span_id == INCOMING_SPAN
    assert root.service == "gw-under-test" and root.attributes["http.response.status_code"] == 200
    assert (
        root.attributes["lora_gateway.key"] == "team-a"
        and "lora_gateway.adapter_version" not in root.attributes
    )
    for name in ("resolve", "lease", "upstream"):
        assert spans[name].parent_span_id == root.span_id and spans[name].trace_id == INCOMING_TRACE
    version, trace_id, parent, flags = header.split("-")
    assert (version, trace_id, parent, flags) == ("00", INCOMING_TRACE, spans["upstream"].span_id, "01")
    statuses = {
        s.attributes["http.response.status_code"]: s.status_code
        for s in receiver.spans()
        if s.name == "POST /v1/completions"
    }
    assert statuses == {502: 2, 404: 0}, "a server span is an error for 5xx only"


def test_an_unreachable_collector_does_not_reach_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    from loadtest.servers.serving import free_port

    setenv(
        monkeypatch,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        },
    )
    tracing = configure_tracing()
    assert tracing is not None
    for _ in range(5):
        tracing.start_request("/v1/completions", {}).end(200, None)
    started = time.monotonic()
    tracing.shutdown()
    assert time.monotonic() - started < 15


def test_a_gateway_traces_its_requests_and_tells_the_engine(
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    cache_dir: Path,
    tiny_cache: dict[str, Path],
    tmp_path: Path,
) -> None:
    setenv(monkeypatch, env_for(receiver))
    engine = {"mode": "attached", "url": ENGINE, "health_interval_s": 0.05}
    settings = Settings(cache_dir=cache_dir, data_dir=tmp_path / "data", engine=engine)
    base = settings.base_model_name()
    client = FakeEngineClient({ENGINE: FakeVllm(base)})
    with serve_app(settings, engine_client=client) as url:
        adapter = httpx.get(url + "/v1/models").json()["data"][1]["id"]  # a demo adapter: it is leased
        headers = {"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"}
        for stream in (False, True):
            body = {"model": adapter, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
            r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=10)
            assert r.status_code == 200
    spans = wait_spans(receiver, 8)
    roots = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert len(roots) == 2
    for root, sent in zip(roots, client.sent_headers[-2:], strict=True):
        children = {s.name: s for s in spans if s.parent_span_id == root.span_id}
        assert set(children) == {"resolve", "lease", "upstream"}, children
        assert root.trace_id == INCOMING_TRACE and root.attributes["lora_gateway.model"] == adapter
        assert (
            root.attributes["lora_gateway.engine"] == ENGINE
            and root.attributes["gen_ai.usage.output_tokens"] == 3
        )
        assert sent["traceparent"].split("-")[1:3] == [INCOMING_TRACE, children["upstream"].span_id]
