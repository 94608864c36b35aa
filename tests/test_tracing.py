"""OpenTelemetry traces (gateway/tracing.py) through the real SDK and its OTLP exporters, into real receivers
on loopback (tests/otlp_receiver.py): off unless configured; a span per request with children for resolve,
lease and upstream; the client's `traceparent` continued; the engine given the upstream span's; the
sampler, batching, endpoint, headers and compression taken from the mapping passed in; a dead collector
never reaching the caller."""

from __future__ import annotations

import io
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import httpx
import pytest

from gateway.settings import Settings
from gateway.tracing import Tracing, configure_tracing
from loadtest.servers.serving import free_port
from tests.conftest import serve_app
from tests.fake_engine import FakeEngineClient, FakeVllm
from tests.otlp_receiver import Receiver, Span, otlp_grpc_receiver, otlp_receiver

ENGINE = "http://engine-a.invalid:8000"
INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_SPAN = "00f067aa0ba902b7"
INCOMING = f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"
SERVER, CLIENT, INTERNAL = 2, 3, 1  # the proto's SpanKind
UNSET, ERROR = 0, 2  # the proto's status codes


def parse_traceparent(header: str) -> tuple[str, str, bool]:
    """W3C trace-context, version 00: (trace id, parent span id, sampled flag); other flag bits ignored
    (the SDK sets 0x02, "random trace id", from W3C level 2)."""
    match = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})", header)
    assert match, header
    trace_id, span_id, flags = match.groups()
    assert trace_id != "0" * 32 and span_id != "0" * 16
    return trace_id, span_id, bool(int(flags, 16) & 1)


@pytest.fixture(autouse=True)
def no_otel_in_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK falls back to os.environ for what a mapping leaves out: none of the runner's OTEL_* here."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with otlp_receiver() as r:
        yield r


def env_for(receiver: Receiver, **more: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_SERVICE_NAME": "gw-under-test",
        **more,
    }


def configured(environ: dict[str, str]) -> Tracing:
    tracing = configure_tracing(environ)
    assert tracing is not None
    return tracing


def one_request(tracing: Tracing, headers: dict[str, str] | None = None) -> dict[str, str]:
    """A request span with its three children, as the gateway makes them; the engine's headers."""
    request = tracing.start_request("/v1/chat/completions", headers or {})
    with request.child("resolve") as resolve:
        resolve.set(**{"lora_gateway.found": True})
    lease = request.start_child("lease")
    lease.set(**{"lora_gateway.adapter": "team-a--support", "lora_gateway.none": None})
    lease.end()
    upstream = request.start_child("upstream")
    upstream.set(**{"server.address": ENGINE})
    sent = upstream.traceparent()
    upstream.end()
    request.set(
        **{
            "lora_gateway.key": "team-a",
            "lora_gateway.model": "support",
            "lora_gateway.adapter_version": None,
        }
    )
    request.end(200, None)
    return sent


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_SERVICE_NAME": "gw", "OTEL_BSP_SCHEDULE_DELAY": "50"},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"},
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"},
        {"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "console"},
    ],
)
def test_off_unless_configured(environ: dict[str, str]) -> None:
    assert configure_tracing(environ) is None


def test_off_by_default_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    assert configure_tracing() is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    tracing = configure_tracing()
    assert tracing is not None
    tracing.shutdown()


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin-ish"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "thrift"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_EXPORTER_OTLP_TIMEOUT": "soon"},
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_EXPORTER_OTLP_COMPRESSION": "brotli"},
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "-1"}, "OTEL_BSP_SCHEDULE_DELAY"),
        (
            {
                "OTEL_TRACES_EXPORTER": "console",
                "OTEL_BSP_MAX_QUEUE_SIZE": "10",
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "20",
            },
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        ),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
        (
            {
                "OTEL_TRACES_EXPORTER": "console",
                "OTEL_TRACES_SAMPLER": "traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "2",
            },
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        # TLS is the SDK's own reading of os.environ: a mapping naming it would be silently ignored
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://x", "OTEL_EXPORTER_OTLP_CERTIFICATE": "/ca.pem"},
            "CERTIFICATE",
        ),
    ],
)
def test_a_bad_setting_is_an_error_naming_it(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        configure_tracing(environ)


def test_tls_settings_are_the_sdks_from_os_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector.invalid:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(tmp_path / "ca.pem"))
    tracing = configure_tracing()
    assert tracing is not None
    tracing.shutdown()


def test_console_exporter() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        tracing = configured({"OTEL_TRACES_EXPORTER": "console"})
        one_request(tracing)
        tracing.shutdown()
    text = out.getvalue()
    for name in ("POST /v1/chat/completions", "resolve", "lease", "upstream", "lora_gateway.key"):
        assert name in text


def test_a_request_span_and_its_children_arrive(receiver: Receiver) -> None:
    tracing = configured(env_for(receiver))
    sent = one_request(tracing)
    spans = {s.name: s for s in receiver.wait(4)}  # batched every 50 ms: before shutdown
    tracing.shutdown()
    assert len(receiver.spans()) == 4
    root = spans["POST /v1/chat/completions"]
    assert root.parent_span_id == "" and root.kind == SERVER and root.status_code == UNSET
    assert root.service == "gw-under-test"
    assert root.attributes == {
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "url.path": "/v1/chat/completions",
        "http.response.status_code": 200,
        "lora_gateway.key": "team-a",
        "lora_gateway.model": "support",
    }
    assert {s.trace_id for s in spans.values()} == {root.trace_id}
    for name in ("resolve", "lease", "upstream"):
        assert spans[name].parent_span_id == root.span_id
    assert spans["upstream"].kind == CLIENT and spans["lease"].kind == INTERNAL
    assert spans["upstream"].attributes == {"server.address": ENGINE}
    assert spans["lease"].attributes == {"lora_gateway.adapter": "team-a--support"}
    assert spans["resolve"].attributes == {"lora_gateway.found": True}
    assert parse_traceparent(sent["traceparent"]) == (root.trace_id, spans["upstream"].span_id, True)
    assert "tracestate" not in sent


def test_the_clients_traceparent_and_tracestate_are_continued(receiver: Receiver) -> None:
    tracing = configured(env_for(receiver))
    sent = one_request(tracing, {"traceparent": INCOMING, "tracestate": "vendor=opaque"})
    tracing.shutdown()
    spans = {s.name: s for s in receiver.wait(4)}
    root = spans["POST /v1/chat/completions"]
    assert root.trace_id == INCOMING_TRACE and root.parent_span_id == INCOMING_SPAN
    assert {s.trace_id for s in spans.values()} == {INCOMING_TRACE}
    assert sent == {
        "traceparent": f"00-{INCOMING_TRACE}-{spans['upstream'].span_id}-01",
        "tracestate": "vendor=opaque",
    }


def test_a_malformed_traceparent_starts_a_new_trace(receiver: Receiver) -> None:
    tracing = configured(env_for(receiver))
    one_request(tracing, {"traceparent": "00-not-a-trace-01"})
    tracing.shutdown()
    root = next(s for s in receiver.wait(4) if s.kind == SERVER)
    assert root.parent_span_id == "" and len(root.trace_id) == 32


def test_end_is_idempotent_and_only_5xx_is_an_error(receiver: Receiver) -> None:
    tracing = configured(env_for(receiver))
    ok = tracing.start_request("/v1/completions", {})
    child = ok.start_child("upstream")
    child.end()
    child.end("late")  # ignored: ended once
    ok.end(200, None)
    ok.end(500, "again")  # ignored
    for status, error in (
        (502, "upstream_error"),
        (500, None),
        (404, "model_not_found"),
        (429, "rate_limited"),
    ):
        tracing.start_request("/v1/completions", {}).end(status, error)
    with pytest.raises(KeyError):
        failing = tracing.start_request("/v1/completions", {})
        with failing.child("resolve"):
            raise KeyError("no such model")
    failing.end(400, "invalid_request")
    tracing.shutdown()
    spans = receiver.wait(8)
    assert len(spans) == 8
    roots = {s.attributes["http.response.status_code"]: s for s in spans if s.kind == SERVER}
    assert roots[200].status_code == UNSET and "error.type" not in roots[200].attributes
    upstream = next(s for s in spans if s.name == "upstream")
    assert upstream.status_code == UNSET and "error.type" not in upstream.attributes
    assert roots[502].status_code == ERROR and roots[502].attributes["error.type"] == "upstream_error"
    assert roots[500].status_code == ERROR and roots[500].attributes["error.type"] == "500"
    for status, code in ((404, "model_not_found"), (429, "rate_limited"), (400, "invalid_request")):
        assert roots[status].status_code == UNSET, "a server span is an error for 5xx only"
        assert "error.type" not in roots[status].attributes
        assert roots[status].attributes["lora_gateway.error_code"] == code
    resolve = next(s for s in spans if s.name == "resolve")
    assert resolve.status_code == ERROR and resolve.attributes["error.type"] == "KeyError"


def test_the_sampler_is_the_sdks(receiver: Receiver) -> None:
    """parentbased_always_on by default: a client's unsampled trace stays unsampled, and vLLM is told so."""
    tracing = configured(env_for(receiver))
    sent = one_request(tracing, {"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-00"})
    tracing.shutdown()
    assert receiver.spans() == []
    trace_id, _, sampled = parse_traceparent(sent["traceparent"])
    assert trace_id == INCOMING_TRACE and not sampled

    tracing = configured(env_for(receiver, OTEL_TRACES_SAMPLER="always_off"))
    sent = one_request(tracing)
    tracing.shutdown()
    assert receiver.spans() == [] and not parse_traceparent(sent["traceparent"])[2]

    tracing = configured(env_for(receiver, OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="0"))
    request = tracing.start_request("/v1/completions", {})
    children = [request.start_child(name) for name in ("lease", "upstream")]
    assert not any(child.span.is_recording() for child in children)
    ids = {parse_traceparent(child.traceparent()["traceparent"])[:2] for child in children}
    root = request.span.get_span_context()
    assert {trace_id for trace_id, _ in ids} == {f"{root.trace_id:032x}"}, (
        "a dropped trace's children: its id"
    )
    assert len({span_id for _, span_id in ids} | {f"{root.span_id:016x}"}) == 3, "each its own span id"
    for child in children:
        child.end("cancelled")
    request.end(499, "client_closed")
    tracing.shutdown()
    assert receiver.spans() == []

    tracing = configured(env_for(receiver, OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="1"))
    one_request(tracing, {"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-00"})  # ratio: parent ignored
    tracing.shutdown()
    assert len(receiver.wait(4)) == 4


def test_endpoint_headers_and_compression_come_from_the_mapping(receiver: Receiver) -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint + "/v1/traces",  # taken as is
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9/ignored",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20abc,x-tenant=gw",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attributes,deployment.environment=test",
    }
    tracing = configured(environ)
    one_request(tracing)
    tracing.shutdown()
    spans = receiver.wait(4)
    assert {s.service for s in spans} == {"from-attributes"}
    headers = receiver.export_headers()[0]
    assert headers["authorization"] == "Bearer abc" and headers["x-tenant"] == "gw"
    assert headers["content-encoding"] == "gzip"


def test_several_tracings_in_one_process() -> None:
    with otlp_receiver() as first, otlp_receiver() as second:
        a = configured(env_for(first, OTEL_SERVICE_NAME="gw-a"))
        b = configured(env_for(second))
        one_request(a)
        one_request(b)
        a.shutdown()
        b.shutdown()
        assert {s.service for s in first.wait(4)} == {"gw-a"} and len(first.spans()) == 4
        assert {s.service for s in second.wait(4)} == {"gw-under-test"} and len(second.spans()) == 4


def test_otlp_over_grpc() -> None:
    pytest.importorskip("grpc")
    with otlp_grpc_receiver() as receiver:
        tracing = configured(
            env_for(receiver, OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_EXPORTER_OTLP_HEADERS="x-tenant=gw")
        )
        one_request(tracing, {"traceparent": INCOMING})
        tracing.shutdown()
        spans = receiver.wait(4)
        assert {s.trace_id for s in spans} == {INCOMING_TRACE}
        assert receiver.export_headers()[0]["x-tenant"] == "gw"


@contextmanager
def dead_collector(kind: str) -> Iterator[str]:
    """`closed`: a port nobody listens on (refused at once); `silent`: one that accepts connections and
    never answers (each export waits out its timeout)."""
    if kind == "closed":
        yield f"http://127.0.0.1:{free_port()}"
        return
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("collector", ["closed", "silent"])
@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_an_unreachable_collector_does_not_reach_the_caller(protocol: str, collector: str) -> None:
    if protocol == "grpc":
        pytest.importorskip("grpc")
    with dead_collector(collector) as endpoint:
        environ = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
        tracing = configured(environ)
        started = time.monotonic()
        for _ in range(20):
            one_request(tracing)
        time.sleep(0.2)  # an export is under way, failing
        for _ in range(20):
            one_request(tracing)
        assert time.monotonic() - started < 1, "the request path never waits for the exporter"
        started = time.monotonic()
        tracing.shutdown()
        assert time.monotonic() - started < 5


def test_a_gateway_traces_its_requests_and_tells_the_engine(
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    cache_dir: Path,
    tiny_cache: dict[str, Path],
    tmp_path: Path,
) -> None:
    for name, value in env_for(receiver).items():  # create_app reads os.environ
        monkeypatch.setenv(name, value)
    engine = {"mode": "attached", "url": ENGINE, "health_interval_s": 0.05}
    settings = Settings(cache_dir=cache_dir, data_dir=tmp_path / "data", engine=engine)
    base = settings.base_model_name()
    client = FakeEngineClient({ENGINE: FakeVllm(base)})
    with serve_app(settings, engine_client=client) as url:
        adapter = httpx.get(url + "/v1/models").json()["data"][1]["id"]  # a demo adapter: it is leased
        for stream in (False, True):
            body = {"model": adapter, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
            r = httpx.post(
                url + "/v1/chat/completions", json=body, headers={"traceparent": INCOMING}, timeout=10
            )
            assert r.status_code == 200
    spans: list[Span] = receiver.wait(8)
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
        assert parse_traceparent(sent["traceparent"]) == (INCOMING_TRACE, children["upstream"].span_id, True)
