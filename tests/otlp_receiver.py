"""Real OTLP trace receivers on loopback, for tests that check the spans a gateway sends.

`otlp_receiver()`: OTLP/HTTP, POST /v1/traces with protobuf bodies (plain, gzip or deflate: what the
OpenTelemetry SDK's OTLP/HTTP exporter sends), in a `ThreadingHTTPServer` thread. `otlp_grpc_receiver()`:
OTLP/gRPC, the collector's TraceService on a grpc server (needs grpcio; tests `importorskip` it). Both
decode with opentelemetry-proto and yield the same `Receiver`:

    with otlp_receiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
        ...
        spans = receiver.wait(4)       # the spans received so far, once there are at least 4
        receiver.spans()               # every span received so far, decoded (`Span`), in arrival order
        receiver.export_headers()      # the request headers (HTTP) or metadata (gRPC) of each export
"""

from __future__ import annotations

import contextlib
import gzip
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass
class Span:
    name: str
    trace_id: str  # hex, 32 digits
    span_id: str  # hex, 16 digits
    parent_span_id: str  # hex; "" for a root span
    kind: int  # the proto's SpanKind: 1 internal, 2 server, 3 client
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    service: str  # the resource's service.name


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class Receiver:
    endpoint: str  # http://127.0.0.1:PORT, what OTEL_EXPORTER_OTLP_ENDPOINT takes
    received: list[Span] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spans(self) -> list[Span]:
        with self.lock:
            return list(self.received)

    def export_headers(self) -> list[dict[str, str]]:
        with self.lock:
            return list(self.headers)

    def wait(self, count: int, timeout: float = 10) -> list[Span]:
        """The spans, once at least `count` have arrived; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while len(spans := self.spans()) < count:
            assert time.monotonic() < deadline, f"{len(spans)} spans received, wanted {count}: {spans}"
            time.sleep(0.02)
        return spans

    def add(self, request: ExportTraceServiceRequest, headers: dict[str, str]) -> None:
        out = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(
                        Span(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            status_code=s.status.code,
                            service=str(resource.get("service.name")),
                        )
                    )
        with self.lock:
            self.received.extend(out)
            self.headers.append(headers)


def _decode(body: bytes, encoding: str) -> ExportTraceServiceRequest:
    if encoding == "gzip":
        body = gzip.decompress(body)
    elif encoding == "deflate":
        body = zlib.decompress(body)
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    return request


@contextlib.contextmanager
def otlp_receiver() -> Iterator[Receiver]:
    """OTLP/HTTP on a free loopback port, served from a thread until the block ends."""
    receiver: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.path == "/v1/traces":
                request = _decode(body, self.headers.get("content-encoding", "").lower())
                receiver.add(request, {k.lower(): v for k, v in self.headers.items()})
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
            else:
                payload = b""
                self.send_response(404)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = Receiver(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def otlp_grpc_receiver() -> Iterator[Receiver]:
    """OTLP/gRPC (plaintext) on a free loopback port, until the block ends."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:  # noqa: N802
            receiver.add(request, {k: str(v) for k, v in context.invocation_metadata()})
            return ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    receiver = Receiver(f"http://127.0.0.1:{port}")
    server.start()
    try:
        yield receiver
    finally:
        server.stop(grace=None)
