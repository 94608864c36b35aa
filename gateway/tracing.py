"""OpenTelemetry traces of the inference requests: off unless the standard `OTEL_*` variables ask for them.

    POST /v1/chat/completions           SERVER span, child of the client's `traceparent` when it sent one
      ├── resolve                       (the model -> a registered target: memory only, microseconds)
      ├── lease                         the adapter leased on its engine: resident, or loaded now
      └── upstream                      CLIENT span: the engine call, until the last byte (a stream's end);
                                        its `traceparent` goes to vLLM, whose own spans
                                        (--otlp-traces-endpoint) then join the same trace

On when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`, or both, comma-separated), or an OTLP
endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: exporter otlp); off
with `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. An unknown exporter, protocol, sampler or
number is a ValueError naming the variable (the SDK would log a warning and carry on). The variables are
read from `configure_tracing(environ)` (os.environ by default), and passed to the SDK explicitly:

    OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL     http/protobuf (default) or grpc (needs ...-proto-grpc)
    OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT     the base one gets /v1/traces appended (http), as in the SDK
    OTEL_EXPORTER_OTLP_(TRACES_)HEADERS      `k=v,k2=v2`, URL-encoded values
    OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT      seconds per export (the Python SDK's unit), default 10
    OTEL_EXPORTER_OTLP_(TRACES_)COMPRESSION  none, gzip, deflate
    OTEL_BSP_*                               batching: SCHEDULE_DELAY, EXPORT_TIMEOUT (ms), MAX_QUEUE_SIZE,
                                             MAX_EXPORT_BATCH_SIZE
    OTEL_TRACES_SAMPLER(_ARG)                the SDK's: always_on, always_off, traceidratio and their
                                             parentbased_ forms; default parentbased_always_on (a
                                             client's sampled flag is followed); the ratio's default 1
    OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES   service.name defaults to lora-gateway

TLS (`..._CERTIFICATE`, `..._CLIENT_KEY`, `..._CLIENT_CERTIFICATE`, `..._INSECURE`) and credential
providers are read by the SDK itself, from os.environ only: a mapping other than os.environ that sets one
is refused rather than silently ignored. With such a mapping the SDK may still fill in what it leaves out
from os.environ (it merges os.environ's OTLP headers, and the resource detectors read it): tests pass a
mapping and leave os.environ's OTEL_* unset.

Spans leave in batches from the SDK's thread, never on the request path: an unreachable collector costs
that thread the exporter's timeout per batch, and log lines, never an exception or a wait in a request
(a full queue, OTEL_BSP_MAX_QUEUE_SIZE, drops spans). Each call builds
its own TracerProvider (the global one is left alone), so one process can hold several.

The request path keeps no context in contextvars: a request's spans end in callbacks (a stream ends in
the relay), so each child names its parent explicitly (`trace.set_span_in_context`). Attributes follow
the HTTP semantic conventions (http.request.method, http.route, url.path, http.response.status_code,
error.type, server.address); the gateway's own are under `lora_gateway.`. A server span is an error for
5xx only: a 4xx keeps status UNSET and no error.type, its code goes to `lora_gateway.error_code`.

Cost, CPU per request (a request span, its three children, ten attributes, a traceparent for the engine;
Python 3.11 on a 2-core Xeon VM, 20k requests, spans sent over OTLP/HTTP to a collector in another
process): sampled, about 110 µs on the request path and 230 µs in all, the SDK's export thread (encoding,
sending) included; for scale, the gateway spends about 300 µs on a proxied request (docs/benchmarks.md),
so under load sample with OTEL_TRACES_SAMPLER=parentbased_traceidratio. Dropped by the sampler: 15 µs
(its children skip the SDK's start_span: `RequestSpan.start_child`). Off: nothing, the request path
checks `span is None`.
"""

from __future__ import annotations

import os
import sys
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.re import parse_env_headers

_PROPAGATOR = TraceContextTextMapPropagator()
Attr = str | int | float | bool | None

_SAMPLERS: dict[str, Callable[[float], Sampler]] = {
    "always_on": lambda _: ALWAYS_ON,
    "always_off": lambda _: ALWAYS_OFF,
    "parentbased_always_on": lambda _: DEFAULT_ON,
    "parentbased_always_off": lambda _: DEFAULT_OFF,
    "traceidratio": TraceIdRatioBased,
    "parentbased_traceidratio": ParentBasedTraceIdRatio,
}
#: Read by the SDK from os.environ whatever `environ` says (suffixes of OTEL_EXPORTER_OTLP_(TRACES_)).
_SDK_ONLY = ("CERTIFICATE", "CLIENT_KEY", "CLIENT_CERTIFICATE", "INSECURE")


def configure_tracing(environ: Mapping[str, str] = os.environ) -> Tracing | None:
    """A `Tracing` when `environ` asks for traces, else None (see the module doc for the variables)."""
    names = _exporter_names(environ)
    if not names:
        return None
    if environ is not os.environ:
        _refuse_sdk_only(environ)
    exporters = [_exporter(name, environ) for name in names]
    resource, sampler = _resource(environ), _sampler(environ)
    queue = int(_number(environ, "OTEL_BSP_MAX_QUEUE_SIZE", 2048))  # every ValueError before a thread starts
    batch = int(_number(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512))
    delay = _number(environ, "OTEL_BSP_SCHEDULE_DELAY", 5000)
    export_timeout = _number(environ, "OTEL_BSP_EXPORT_TIMEOUT", 30000)
    if not 0 < batch <= queue:
        raise ValueError(
            f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE: {batch}, not from 1 to OTEL_BSP_MAX_QUEUE_SIZE ({queue})"
        )
    provider = TracerProvider(resource=resource, sampler=sampler)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter, queue, delay, batch, export_timeout))
    return Tracing(provider)


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        return [n.strip() for n in named.split(",") if n.strip() and n.strip() != "none"]
    if _otlp(environ, "ENDPOINT"):
        return ["otlp"]
    return []


def _otlp_name(environ: Mapping[str, str], name: str) -> str:
    """OTEL_EXPORTER_OTLP_TRACES_<name> when it is set, else OTEL_EXPORTER_OTLP_<name>."""
    traces = f"OTEL_EXPORTER_OTLP_TRACES_{name}"
    return traces if environ.get(traces, "").strip() else f"OTEL_EXPORTER_OTLP_{name}"


def _otlp(environ: Mapping[str, str], name: str) -> str | None:
    return environ.get(_otlp_name(environ, name), "").strip() or None


def _refuse_sdk_only(environ: Mapping[str, str]) -> None:
    named = [
        name
        for name in environ
        if name.startswith("OTEL_PYTHON_EXPORTER_OTLP_")
        or any(name in (f"OTEL_EXPORTER_OTLP_{s}", f"OTEL_EXPORTER_OTLP_TRACES_{s}") for s in _SDK_ONLY)
    ]
    if named:
        raise ValueError(
            f"{', '.join(sorted(named))}: read by the OpenTelemetry SDK from os.environ only; set it there"
        )


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}: {raw!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{name}: {raw!r} is negative")
    return value


def _exporter(name: str, environ: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter(out=sys.stdout)  # today's stdout (its default is the one at import)
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console or none)")
    protocol = _otlp(environ, "PROTOCOL") or "http/protobuf"
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or None
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or None
    headers = parse_env_headers(_otlp(environ, "HEADERS") or "", liberal=True)
    timeout = _number(environ, _otlp_name(environ, "TIMEOUT"), 10)
    compression = (_otlp(environ, "COMPRESSION") or "none").lower()
    if compression not in ("none", "gzip", "deflate"):
        variable = _otlp_name(environ, "COMPRESSION")
        raise ValueError(f"{variable}: {compression!r} is not none, gzip or deflate")
    if protocol == "grpc":
        try:
            import grpc  # type: ignore[import-untyped,unused-ignore]  # no stubs; optional package
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
        except ImportError as exc:
            variable = _otlp_name(environ, "PROTOCOL")
            raise ValueError(f"{variable}=grpc needs opentelemetry-exporter-otlp-proto-grpc") from exc
        codec = {
            "none": grpc.Compression.NoCompression,
            "gzip": grpc.Compression.Gzip,
            "deflate": grpc.Compression.Deflate,
        }
        return Grpc(
            endpoint=endpoint or base or "http://localhost:4317",  # http:// means plaintext, as in the SDK
            headers=dict(headers) or None,
            timeout=timeout,
            compression=codec[compression],
        )
    if protocol != "http/protobuf":
        variable = _otlp_name(environ, "PROTOCOL")
        raise ValueError(f"{variable}: {protocol!r} is not supported (http/protobuf, grpc)")
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(
        endpoint=endpoint or f"{(base or 'http://localhost:4318').removesuffix('/')}/v1/traces",
        headers=headers,
        timeout=timeout,
        compression=Compression(compression),
    )


def _sampler(environ: Mapping[str, str]) -> Sampler:
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    if name not in _SAMPLERS:
        raise ValueError(f"OTEL_TRACES_SAMPLER: unknown sampler {name!r} ({', '.join(_SAMPLERS)})")
    rate = _number(environ, "OTEL_TRACES_SAMPLER_ARG", 1.0) if name.endswith("traceidratio") else 1.0
    if rate > 1:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG: {rate} is not a ratio between 0 and 1")
    return _SAMPLERS[name](rate)


def _resource(environ: Mapping[str, str]) -> Resource:
    """OTEL_SERVICE_NAME, else OTEL_RESOURCE_ATTRIBUTES' service.name, else lora-gateway."""
    attributes: dict[str, str] = {}
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = urllib.parse.unquote(value.strip())
    service = environ.get("OTEL_SERVICE_NAME", "").strip() or attributes.get(SERVICE_NAME) or "lora-gateway"
    return Resource.create({**attributes, SERVICE_NAME: service})


class Tracing:
    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("lora_gateway")
        self.ids = provider.id_generator

    def start_request(self, route: str, headers: Mapping[str, str]) -> RequestSpan:
        """The SERVER span of one inference request (always POST); the client's W3C `traceparent` and
        `tracestate`, when valid, make it a child of the client's span."""
        carrier = {k: v for k in ("traceparent", "tracestate") if (v := headers.get(k))}
        span = self.tracer.start_span(
            f"POST {route}",
            context=_PROPAGATOR.extract(carrier) if carrier else None,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": route, "url.path": route},
        )
        return RequestSpan(self, span)

    def shutdown(self) -> None:
        """Exports what is batched (each try bounded by the exporter's timeout), then stops the exporters."""
        self.provider.shutdown()


def _attributes(values: Mapping[str, Attr]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class ChildSpan:
    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.ended = False

    def set(self, **attributes: Attr) -> None:
        """Attributes; None values are left out."""
        self.span.set_attributes(_attributes(attributes))

    def traceparent(self) -> dict[str, str]:
        """W3C headers (`traceparent`, and `tracestate` when there is one) naming this span as the parent,
        for the engine. A dropped trace gives a traceparent with the sampled flag off."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self.span))
        return carrier

    def end(self, error: str | None = None) -> None:
        """Ends the span (once; later calls do nothing); an `error` marks it ERROR with that error.type."""
        if self.ended:
            return
        self.ended = True
        if error:
            self.span.set_attribute("error.type", error)
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()


class RequestSpan:
    def __init__(self, tracing: Tracing, span: trace.Span) -> None:
        self.tracing = tracing
        self.span = span
        self.ended = False

    def start_child(self, name: str) -> ChildSpan:
        """A child that the caller ends, possibly elsewhere (a stream's upstream span ends with the stream).
        `upstream` is a CLIENT span, the others INTERNAL."""
        if not self.span.is_recording():
            # A dropped trace: each of the samplers above drops the children too (they decide on the
            # parent, or on the trace id, which is the parent's), so the SDK's start_span (sampler, context,
            # metrics; about 5 µs a child) is skipped. A span id of its own still, for its traceparent.
            parent = self.span.get_span_context()
            dropped = trace.SpanContext(
                parent.trace_id,
                self.tracing.ids.generate_span_id(),
                is_remote=False,
                trace_flags=parent.trace_flags,
                trace_state=parent.trace_state,
            )
            return ChildSpan(trace.NonRecordingSpan(dropped))
        kind = SpanKind.CLIENT if name == "upstream" else SpanKind.INTERNAL
        context = trace.set_span_in_context(self.span)
        return ChildSpan(self.tracing.tracer.start_span(name, context=context, kind=kind))

    @contextmanager
    def child(self, name: str) -> Iterator[ChildSpan]:
        """A child ended when the block ends; an exception ends it as an error (the gateway error's code,
        else the exception's class name), recorded on the span, and goes on."""
        span = self.start_child(name)
        try:
            yield span
        except BaseException as exc:
            span.span.record_exception(exc)
            span.end(getattr(exc, "code", None) or type(exc).__name__)
            raise
        span.end()

    def set(self, **attributes: Attr) -> None:
        """Attributes; None values are left out."""
        self.span.set_attributes(_attributes(attributes))

    def end(self, status: int, error: str | None) -> None:
        """Ends the request span (once; later calls do nothing) with its response status. 5xx: status ERROR
        and error.type (`error`, else the status); `error` is also kept as lora_gateway.error_code."""
        if self.ended:
            return
        self.ended = True
        self.span.set_attribute("http.response.status_code", status)
        if error:
            self.span.set_attribute("lora_gateway.error_code", error)
        if status >= 500:
            self.span.set_attribute("error.type", error or str(status))
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()
