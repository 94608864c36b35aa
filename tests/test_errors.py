"""The error-mapping table: engine answers and transport failures -> our status and OpenAI body.

Pure logic, so the transport failures are exception instances; the same paths run against real servers
in test_errors_e2e.py (refused connection, read timeout, engine gone).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiohttp
import pytest

from gateway.errors import GatewayError, from_upstream
from gateway.settings import Settings
from gateway.upstream import UpstreamClient, map_transport_error
from tests.conftest import free_port


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
        (500, b"<html><body>Internal Server Error</body></html>", 502, "engine_error", "server_error"),
        (500, b'{"detail":"boom"}', 502, "engine_error", "server_error"),
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


def connector_error() -> aiohttp.ClientConnectorError:
    key = SimpleNamespace(host="127.0.0.1", port=1, is_ssl=False, ssl=None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (connector_error(), 502, "engine_unreachable"),
        (aiohttp.ConnectionTimeoutError("slow connect"), 502, "engine_unreachable"),
        (aiohttp.SocketTimeoutError("slow read"), 504, "upstream_timeout"),
        (TimeoutError(), 504, "upstream_timeout"),
        (aiohttp.ServerDisconnectedError(), 502, "upstream_error"),
        (aiohttp.ClientPayloadError("truncated"), 502, "upstream_error"),
        (aiohttp.ClientOSError(104, "reset"), 502, "upstream_error"),
    ],
)
def test_transport_errors(exc: Exception, status: int, code: str) -> None:
    err = map_transport_error(exc)
    assert (err.status_code, err.code) == (status, code)
    assert "<html" not in err.message


def test_connection_refused_is_502_through_the_real_client() -> None:
    async def go() -> GatewayError:
        client = UpstreamClient(Settings())
        try:
            await client.send("POST", f"http://127.0.0.1:{free_port()}/v1/chat/completions", content=b"{}")
        except GatewayError as err:
            return err
        finally:
            await client.aclose()
        raise AssertionError("no error raised")

    err = asyncio.run(go())
    assert (err.status_code, err.code) == (502, "engine_unreachable")
    assert isinstance(err.__cause__, aiohttp.ClientError)
