"""The gateway's OpenAPI schema (/docs, /openapi.json) lists every route a client or operator calls."""

from __future__ import annotations

from pathlib import Path

from gateway.app import create_app
from gateway.settings import Settings


def test_schema_lists_the_inference_and_admin_routes(tmp_path: Path) -> None:
    settings = Settings(
        cache_dir=tmp_path, data_dir=tmp_path, engine={"mode": "attached", "url": "http://127.0.0.1:9"}
    )
    paths = create_app(settings).openapi()["paths"]
    assert "post" in paths["/v1/chat/completions"] and "post" in paths["/v1/completions"]
    assert "get" in paths["/v1/models"] and "get" in paths["/health"]
    assert "post" in paths["/admin/adapters"] and "get" in paths["/admin/engines"]
