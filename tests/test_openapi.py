"""The gateway's OpenAPI schema (/docs, /openapi.json) lists every route a client or operator calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.app import create_app
from gateway.errors import EngineUnavailableError, ErrorResponse, ModelNotFoundError, error_body
from gateway.settings import Settings


def test_schema_lists_the_inference_and_admin_routes(tmp_path: Path) -> None:
    settings = Settings(
        cache_dir=tmp_path, data_dir=tmp_path, engine={"mode": "attached", "url": "http://127.0.0.1:9"}
    )
    paths = create_app(settings).openapi()["paths"]
    assert "post" in paths["/v1/chat/completions"] and "post" in paths["/v1/completions"]
    assert "get" in paths["/v1/models"] and "get" in paths["/health"]
    assert "post" in paths["/v1/responses"] and "get" in paths["/v1/models/{model_id}"]
    assert "post" in paths["/admin/adapters"] and "get" in paths["/admin/engines"]


def _schema(tmp_path: Path) -> dict[str, Any]:
    settings = Settings(
        cache_dir=tmp_path, data_dir=tmp_path, engine={"mode": "attached", "url": "http://127.0.0.1:9"}
    )
    return create_app(settings).openapi()


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, ops in schema["paths"].items() for method, op in ops.items()]


ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def test_every_error_response_is_the_openai_error_object(tmp_path: Path) -> None:
    schema = _schema(tmp_path)
    for method, path, op in _operations(schema):
        responses = op["responses"]
        assert {"500", "4XX"} <= set(responses), (method, path)
        assert "422" not in responses, (method, path)  # FastAPI's own shape: never answered here
        for status, response in responses.items():
            if status.startswith(("4", "5")) and not (path == "/health" and status == "503"):
                assert response["content"] == {"application/json": {"schema": ERROR_REF}}, (path, status)
    health_503 = schema["paths"]["/health"]["get"]["responses"]["503"]
    assert health_503["content"]["application/json"]["schema"]["$ref"].endswith("/HealthUnavailable")
    assert "Retry-After" in health_503["headers"]


def test_inference_routes_document_their_bodies_statuses_and_streams(tmp_path: Path) -> None:
    schema = _schema(tmp_path)
    components = schema["components"]["schemas"]
    for path, body in (
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/completions", "CompletionRequest"),
        ("/v1/responses", "ResponsesRequest"),
    ):
        op = schema["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{body}" and op["requestBody"]["required"]
        assert {"400", "401", "403", "404", "413", "500", "502", "503", "504"} <= set(op["responses"])
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        assert op["security"] == [{"ApiKey": []}]
    assert {"model", "messages"} <= set(components["ChatCompletionRequest"]["required"])
    assert {"model", "prompt"} <= set(components["CompletionRequest"]["required"])
    assert {"model", "input"} <= set(components["ResponsesRequest"]["required"])
    assert "max_output_tokens" in components["ResponsesRequest"]["properties"]
    assert "max_tokens" not in components["ResponsesRequest"]["properties"]
    events = schema["paths"]["/v1/responses"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert "response.completed" in events["schema"]["properties"]["data"]["description"]
    retrieve = schema["paths"]["/v1/models/{model_id}"]["get"]
    assert retrieve["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ModelCard"
    )
    assert {"401", "404"} <= set(retrieve["responses"]) and retrieve["security"] == [{"ApiKey": []}]
    api_key = schema["components"]["securitySchemes"]["ApiKey"]
    assert (api_key["type"], api_key["scheme"]) == ("http", "bearer")


def test_admin_routes_document_credentials_bodies_and_answers(tmp_path: Path) -> None:
    schema = _schema(tmp_path)
    for method, path, op in _operations(schema):
        if not path.startswith("/admin/"):
            continue
        assert op["security"] == [{"AdminToken": []}], (method, path)
        assert {"401", "403"} <= set(op["responses"]), (method, path)
        created = (method, path) in (("post", "/admin/adapters"), ("post", "/admin/keys"))
        success = op["responses"]["201" if created else "200"]
        assert "$ref" in success["content"]["application/json"]["schema"], (method, path)
        if "{name}" in path:
            assert "404" in op["responses"], (method, path)
        bodied = ("/admin/adapters", "/admin/adapters/{name}/alias", "/admin/keys", "/admin/keys/{name}")
        if method in ("post", "put", "patch") and path in bodied:
            assert {"400", "413"} <= set(op["responses"]), (method, path)
            body = op["requestBody"]["content"]["application/json"]["schema"]
            assert body["additionalProperties"] is False, (method, path)
            # A PATCH changes what it names; the alias takes one of two fields (`oneOf`).
            assert body.get("required") or body.get("oneOf") or method == "patch", (method, path)


def test_every_success_documents_its_shape(tmp_path: Path) -> None:
    for method, path, op in _operations(_schema(tmp_path)):
        success = [r for s, r in op["responses"].items() if s.startswith("2")]
        assert len(success) == 1, (method, path)
        assert all(media.get("schema") for media in success[0]["content"].values()), (method, path)


def test_the_error_model_matches_what_the_gateway_sends() -> None:
    for exc in (ModelNotFoundError("x"), EngineUnavailableError("busy", extra={"engines": []})):
        ErrorResponse.model_validate(exc.body())
    ErrorResponse.model_validate(error_body("m", "server_error", None, 502))
