"""schemathesis against a live gateway over real HTTP: every operation of its own OpenAPI document, with
credentials, a bounded number of generated requests each; no answer may be a 5xx or contradict the
document (status, content type, headers, body schema).

The session gateway runs with no admin token and no API keys, so the fuzzed gateway is an in-process one
on the session's vLLM (`serve_app`) with both set: the auth paths answer as in production. Each request
carries a valid credential, most of the time; otherwise a wrong one, none, or (inference) a key that may
call no model, so the 401 and 403 paths are fuzzed too.

What is fuzzed, and how:
- every operation, with schemathesis's positive and negative data (bodies, path and query values);
- the inference routes also with generated bodies aimed at the real base model (`max_tokens` and `n`,
  or the Responses API's `max_output_tokens`, capped so vLLM answers quickly): otherwise every `model`
  is random and the answer always a 404;
- `GET /v1/models/{model_id}` also with the base model's id, so its 200s are checked too;
- the admin routes on `{name}` also with the one registered adapter's name, so its 200s are checked
  against the document, and it is registered again whenever a fuzzed DELETE has removed it. `pin` is
  fuzzed with generated names only: pinning the real adapter would load it into the shared vLLM,
  which the session's other tests count on. Nothing else is left out.

    .venv/bin/python -m pytest -q tests/test_openapi_fuzz.py -s   # -s prints the statuses seen
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import GatewayProcess, serve_app
from tests.registry_helpers import BASE, register, registry_settings, write_adapter

pytestmark = pytest.mark.engine

ADMIN = "fuzz-admin-token"
KEY, NO_MODELS_KEY = "fuzz-key", "fuzz-key-no-models"
ADAPTER = "fuzz-a"
EXAMPLES = 25  # generated requests per operation: the whole run stays well under a minute
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzzed(
    gateway_proc: GatewayProcess, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path_factory
) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    root = tmp / "src"
    write_adapter(tiny_cache["base"], root / ADAPTER, seed=900)
    keys = [{"key": KEY, "models": ["*"]}, {"key": NO_MODELS_KEY, "models": ["none-*"]}]
    settings_ = registry_settings(
        gateway_proc.vllm_url, cache_dir, tmp, root, auth={"admin_token": ADMIN, "api_keys": keys}
    )
    with serve_app(settings_, ready_timeout=300) as url:  # a loaded 2-core box answers probes late
        register(url, ADAPTER, root / ADAPTER, token=ADMIN)
        yield url, root


def _on_real_model(case: schemathesis.Case) -> schemathesis.Case:
    """A generated inference body, sent to the base model and asking for little work."""
    if isinstance(case.body, dict):
        body = dict(case.body)
        body["model"] = BASE
        body["max_tokens"] = min(body.get("max_tokens") or 4, 4)
        if body.get("max_completion_tokens") is not None:
            body["max_completion_tokens"] = min(body["max_completion_tokens"], 4)
        body["n"] = min(body.get("n", 1), 2)
        if case.path == "/v1/responses":  # its own field; `max_tokens` and `n` are not its
            body["max_output_tokens"] = min(body.get("max_output_tokens") or 4, 4)
            body.pop("max_tokens")
            body.pop("n")
        case.body = body
    return case


def _on_real_model_id(case: schemathesis.Case) -> schemathesis.Case:
    case.path_parameters = {**(case.path_parameters or {}), "model_id": BASE}
    return case


def _on_real_adapter(case: schemathesis.Case) -> schemathesis.Case:
    case.path_parameters = {**(case.path_parameters or {}), "name": ADAPTER}
    return case


def _strategy(operation: Any) -> st.SearchStrategy[schemathesis.Case]:
    positive = operation.as_strategy(GenerationMode.POSITIVE)
    strategies = [positive, operation.as_strategy(GenerationMode.NEGATIVE)]
    if operation.path.startswith("/v1/") and operation.method.upper() == "POST":
        strategies.append(positive.map(_on_real_model))
    if "{model_id}" in operation.path:
        strategies.append(positive.map(_on_real_model_id))
    if "{name}" in operation.path and not operation.path.endswith("/pin"):
        strategies.append(positive.map(_on_real_adapter))
    return st.one_of(strategies)


def _credential(path: str, choice: str) -> dict[str, str]:
    token = {"valid": ADMIN if path.startswith("/admin") else KEY, "wrong": "wrong", "none": None}.get(choice)
    if choice == "restricted":
        token = NO_MODELS_KEY if path.startswith("/v1/") else ADMIN
    return {"Authorization": f"Bearer {token}"} if token else {}


def test_every_operation_answers_as_documented(fuzzed: tuple[str, Path]) -> None:
    url, root = fuzzed
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 25, [op.label for op in operations]
    session = requests.Session()
    seen: dict[str, Counter[int]] = {}
    failures: list[str] = []
    started = time.monotonic()
    for operation in operations:
        statuses = seen.setdefault(operation.label, Counter())
        try:
            _fuzz(operation, url, root, session, statuses)
        except Exception as exc:  # every operation is fuzzed; all findings are reported together
            failures.append(f"{operation.label}: {exc}")
    elapsed = time.monotonic() - started
    print(f"\nschemathesis: {len(operations)} operations in {elapsed:.1f} s")
    for label, counts in seen.items():
        print(f"  {label}: {dict(sorted(counts.items()))}")
    assert not failures, "\n\n".join(failures)
    for route in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/responses"):
        assert seen[route][200] and seen[route][400] and seen[route][401] and seen[route][404], seen[route]
    assert seen["GET /admin/adapters/{name}"][200] and seen["GET /admin/adapters/{name}"][404]
    assert seen["GET /v1/models/{model_id}"][200] and seen["GET /v1/models/{model_id}"][404]


def _fuzz(operation: Any, url: str, root: Path, session: requests.Session, statuses: Counter[int]) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],  # a failure is reported as found, not shrunk
        suppress_health_check=list(HealthCheck),
    )
    @given(
        case=_strategy(operation),
        credential=st.sampled_from(["valid", "valid", "valid", "wrong", "none", "restricted"]),
    )
    def fuzz(case: schemathesis.Case, credential: str) -> None:
        if case.path_parameters and case.path_parameters.get("name") == ADAPTER:
            _ensure_registered(url, root)
        headers = _credential(operation.path, credential)
        response = case.call(base_url=url, session=session, headers=headers, timeout=60)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS, headers=headers)

    fuzz()


def _ensure_registered(url: str, root: Path) -> None:
    """A fuzzed DELETE may have removed the adapter: register it again for the next request."""
    headers = {"authorization": f"Bearer {ADMIN}"}
    if httpx.get(f"{url}/admin/adapters/{ADAPTER}", headers=headers).status_code == 404:
        register(url, ADAPTER, root / ADAPTER, token=ADMIN)
