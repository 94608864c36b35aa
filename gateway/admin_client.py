"""A client of a running gateway's admin API (`gateway/api/admin.py`): one call, its JSON answer or one error.

    call("http://127.0.0.1:8000", token, "POST", "/admin/adapters", body={"name": "sql", "source": "/srv/a"})

`lora-gateway adapters ...` (`gateway/cli_adapters.py`), `lora-gateway train --register`
(`adapters/report.py`) and the routing load test (`loadtest/routing/run.py`) all call through it. Every
failure is an `AdminError`: the gateway's OpenAI-shaped error (message, code, param), code
`gateway_unreachable` when no answer came, or the bare HTTP status when the answer is not JSON.
"""

from __future__ import annotations

from typing import Any

import httpx

# Registration may download from the Hub and hash large files: allow a long read.
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=5.0)


class AdminError(Exception):
    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


def call(
    url: str,
    token: str | None,
    method: str,
    path: str,
    *,
    body: Any = None,
    params: Any = None,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    trust_env: bool = True,
) -> Any:
    """One admin API call; returns the decoded JSON, raises `AdminError` for any failure."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.request(
            method,
            url.rstrip("/") + path,
            json=body,
            params=params,
            headers=headers,
            timeout=timeout,
            trust_env=trust_env,
        )
    except httpx.HTTPError as exc:
        raise AdminError(f"Cannot reach the gateway at {url}: {exc}", "gateway_unreachable") from exc
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.is_success and data is not None:
        return data
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        raise AdminError(str(error.get("message")), error.get("code"), error.get("param"))
    raise AdminError(f"HTTP {r.status_code} from {url}: {r.text[:200]}", str(r.status_code))
