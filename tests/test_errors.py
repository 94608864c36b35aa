"""The error-mapping table: engine answers and transport failures -> our status and OpenAI body.

Pure logic, so the engine is an `httpx.MockTransport`; the same paths run against real servers in
test_errors_e2e.py.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gateway.errors import GatewayError, from_upstream
from gateway.settings import Settings
from gateway.upstream import UpstreamClient


@pytest.mark.parametrize(
    ("status", "content", "expected_status", "expected_code", "expected_type"),
    [
        (
            400,
            b'{"error":{"message":"bad","type":"BadRequestError","param":"n","code":400}}',
            400,
            "400",
            "invalid_request_error",
        ),
        (
            404,
            b'{"error":{"message":"The model `x` does not exist.","type":"NotFoundError","code":404}}',
            404,
            "model_not_found",
            "invalid_request_error",
        ),
        (500, b"<html><body>Internal Server Error</body></html>", 502, "upstream_error", "server_error"),
        (500, b'{"detail":"boom"}', 502, "upstream_error", "server_error"),
        (503, b"", 503, "engine_unavailable", "server_error"),
        (422, b'{"detail":[{"loc":["body","x"]}]}', 422, "422", "invalid_request_error"),
    ],
)
def test_from_upstream(
    status: int, content: bytes, expected_status: int, expected_code: str, expected_type: str
):
    err = from_upstream(status, content)
    assert err.status_code == expected_status
    body = err.body()["error"]
    assert body["code"] == expected_code and body["type"] == expected_type
    assert "<html" not in body["message"]


def raising(exc: Exception) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (httpx.ConnectError("refused"), 502, "engine_unreachable"),
        (httpx.ConnectTimeout("slow"), 502, "engine_unreachable"),
        (httpx.ReadTimeout("slow"), 504, "upstream_timeout"),
        (httpx.WriteTimeout("slow"), 504, "upstream_timeout"),
        (httpx.PoolTimeout("busy"), 503, "engine_unavailable"),
        (httpx.RemoteProtocolError("peer closed"), 502, "upstream_error"),
        (httpx.ReadError("reset"), 502, "upstream_error"),
    ],
)
def test_transport_errors(exc: Exception, status: int, code: str) -> None:
    async def go() -> GatewayError:
        client = UpstreamClient(Settings(), transport=raising(exc))
        try:
            await client.send("POST", "http://engine/v1/chat/completions", content=b"{}")
        except GatewayError as err:
            return err
        finally:
            await client.aclose()
        raise AssertionError("no error raised")

    err = asyncio.run(go())
    assert (err.status_code, err.code) == (status, code)
    assert isinstance(err.__cause__, httpx.TransportError)
    if status == 503:
        assert "Retry-After" in err.headers
