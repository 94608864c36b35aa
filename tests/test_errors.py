"""The error-mapping tables: engine answers, transport failures and adapter refusals -> our status and
OpenAI body.

Pure logic, so the transport failures are exception instances; the same paths run against real servers
in test_errors_e2e.py (refused connection, read timeout, engine gone).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiohttp
import pytest

from adapters.validate import AdapterRefusedError, AdapterValidationError
from gateway.errors import GatewayError, from_upstream, refusal_error
from gateway.registry.sources import SourceError
from gateway.registry.store import RegistryNotFoundError
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


@pytest.mark.parametrize(
    ("refusal", "status", "type_"),
    [
        (AdapterValidationError("r too large", "rank_too_large", "r"), 400, "invalid_request_error"),
        (AdapterValidationError("big", "too_large", "source"), 413, "invalid_request_error"),
        (SourceError("outside", "source_not_allowed", "source"), 403, "permission_error"),
        (SourceError("no such revision", "revision_not_found", "revision"), 404, "invalid_request_error"),
        (RegistryNotFoundError("no v7", "version_not_found", "version"), 404, "invalid_request_error"),
        (AdapterRefusedError("base unknown", "engine_unavailable"), 503, "server_error"),
    ],
)
def test_adapter_refusals(refusal: AdapterRefusedError, status: int, type_: str) -> None:
    """Validation, source and registry refusals share one base and one code -> status table."""
    err = refusal_error(refusal)
    assert err.status_code == status
    assert err.body() == {
        "error": {"message": refusal.message, "type": type_, "param": refusal.param, "code": refusal.code}
    }
    assert ("Retry-After" in err.headers) == (status == 503)
