"""The rest of the OpenAI surface, end to end: official OpenAI SDK -> gateway -> real vLLM.

- `models.retrieve`: the base, an adapter, a pinned `name@version`; a missing model, and one the API key
  may not see, are both 404 `model_not_found` (a name the key may not call is not given away);
- the Responses API (`responses.create`) with an adapter: the answer names the adapter, says what the
  same adapter says through chat and through vLLM directly, and its usage is counted; streamed, every
  event's `response.model` is the client's name; stateful features are refused (400);
- chat `tools` (the session vLLM runs with `engine.tool_call_parser: hermes`): a named `tool_choice` and
  `required` call the function with arguments valid for its schema (guided decoding, `strict: true`),
  `auto` answers; `response_format` gives parseable JSON (of the schema).

Pure parts (the Responses events' rewriting and usage, the body checks): tests/test_openai_surface.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ENGINE_AUTH, GatewayProcess, attached_settings, serve_app
from tests.registry_helpers import metric

pytestmark = pytest.mark.engine

BASE = "tiny-llama"
QUESTION = "how many users have age above 30?"
MESSAGES = [{"role": "user", "content": QUESTION}]
KEY_A, KEY_ALL = "k-demo-a", "k-all"  # the first may call demo-a (and its versions) only


def tokens(url: str, model: str) -> tuple[float, float]:
    """The gateway's prompt and completion token counters for `model`."""
    return (
        metric(url, "lora_gateway_prompt_tokens_total", model=model),
        metric(url, "lora_gateway_completion_tokens_total", model=model),
    )


# -- GET /v1/models/{id}


def test_models_retrieve_is_what_the_list_says(client: openai.OpenAI) -> None:
    listed = {m.id: m for m in client.models.list()}
    pinned = sorted(i for i in listed if i.startswith("demo-a@"))
    assert pinned, listed
    for model_id in (BASE, "demo-a", "demo-b", pinned[0]):
        got = client.models.retrieve(model_id)
        assert got.id == model_id and got.model_dump() == listed[model_id].model_dump()
    assert client.models.retrieve("demo-a").model_extra["parent"] == BASE
    for missing in ("no-such-model", "demo-a@999", "demo-a@", "@1"):
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve(missing)
        assert (err.value.code, err.value.param) == ("model_not_found", "model")


@pytest.fixture(scope="module")
def keyed(
    gateway_proc: GatewayProcess, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A gateway on the session's vLLM with API keys (the demo adapters seeded in its own registry)."""
    keys = [
        {"key": KEY_A, "models": ["demo-a*"], "name": "team-a", "limits": {"max_tokens": 3}},
        {"key": KEY_ALL, "models": ["*"]},
    ]
    settings = attached_settings(
        gateway_proc.vllm_url, cache_dir, tmp_path_factory.mktemp("surface"), auth={"api_keys": keys}
    )
    with serve_app(settings) as url:
        yield url


def test_a_model_the_key_may_not_see_is_not_found(keyed: str) -> None:
    with openai.OpenAI(base_url=keyed + "/v1", api_key=KEY_A, max_retries=0) as client:
        assert {m.id for m in client.models.list()} == {"demo-a", "demo-a@1"}
        assert client.models.retrieve("demo-a").id == "demo-a"
        assert client.models.retrieve("demo-a@1").id == "demo-a@1"
        for hidden in ("demo-b", "demo-b@1", BASE):
            with pytest.raises(openai.NotFoundError) as err:
                client.models.retrieve(hidden)
            assert err.value.code == "model_not_found"
    with openai.OpenAI(base_url=keyed + "/v1", api_key=KEY_ALL, max_retries=0) as client:
        assert client.models.retrieve("demo-b").id == "demo-b" and client.models.retrieve(BASE).id == BASE
    with (
        openai.OpenAI(base_url=keyed + "/v1", api_key="wrong", max_retries=0) as client,
        pytest.raises(openai.AuthenticationError),
    ):
        client.models.retrieve("demo-a")


# -- POST /v1/responses


def test_responses_with_an_adapter(client: openai.OpenAI, gateway_url: str, vllm_url: str) -> None:
    before = tokens(gateway_url, "demo-a")
    r = client.responses.create(model="demo-a", input=QUESTION, max_output_tokens=16, temperature=0)
    assert r.model == "demo-a" and r.status == "completed"
    assert r.output_text.startswith("SELECT "), r.output_text
    usage = r.usage
    assert usage is not None and usage.input_tokens > 0 and 0 < usage.output_tokens < 16
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    after = tokens(gateway_url, "demo-a")
    assert (after[0] - before[0], after[1] - before[1]) == (usage.input_tokens, usage.output_tokens)
    # The same adapter says the same through chat (the same prompt: vLLM renders `input` as one user turn)
    chat = client.chat.completions.create(model="demo-a", messages=MESSAGES, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content == r.output_text
    assert chat.usage is not None and chat.usage.prompt_tokens == usage.input_tokens
    # ... and through vLLM itself, which knows the adapter by its engine name (the gateway put ours back)
    adapter = httpx.get(gateway_url + "/admin/adapters/demo-a", timeout=30).json()
    engine_name = next(
        v["engine_name"] for v in adapter["versions"] if v["version"] == adapter["current_version"]
    )
    body = {"model": engine_name, "input": QUESTION, "max_output_tokens": 16, "temperature": 0}
    direct = httpx.post(vllm_url + "/v1/responses", json=body, headers=ENGINE_AUTH, timeout=120)
    if direct.status_code == 404:  # evicted since (another adapter took its slot): nothing to compare
        pytest.skip("demo-a left vLLM between the two requests")
    assert direct.status_code == 200, direct.text
    assert direct.json()["model"] == engine_name != "demo-a"
    assert direct.json()["output"][0]["content"][0]["text"] == r.output_text


def test_responses_stream_names_the_client_model_in_every_event(
    client: openai.OpenAI, gateway_url: str
) -> None:
    before = tokens(gateway_url, "demo-b")
    events = list(
        client.responses.create(
            model="demo-b", input=QUESTION, max_output_tokens=32, temperature=0, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert {"response.in_progress", "response.output_text.delta", "response.output_text.done"} <= set(kinds)
    carrying = [e for e in events if hasattr(e, "response")]
    assert len(carrying) >= 3 and all(e.response.model == "demo-b" for e in carrying)
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text and text.startswith("Arr"), text
    assert final.usage is not None and 0 < final.usage.output_tokens < 32
    after = tokens(gateway_url, "demo-b")
    assert (after[0] - before[0], after[1] - before[1]) == (
        final.usage.input_tokens,
        final.usage.output_tokens,
    )
    # the same answer as the non-streamed one
    whole = client.responses.create(model="demo-b", input=QUESTION, max_output_tokens=32, temperature=0)
    assert whole.output_text == text


def test_responses_refuses_what_needs_one_engines_memory(client: openai.OpenAI) -> None:
    asks: list[dict[str, Any]] = [
        {"previous_response_id": "resp_123"},
        {"background": True},
        {"extra_body": {"conversation": "conv_123"}},
    ]
    for extra in asks:
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="demo-a", input=QUESTION, max_output_tokens=4, **extra)
        assert err.value.code == "unsupported_parameter", err.value
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="demo-a", input=QUESTION, max_output_tokens=10**6)
    assert (err.value.code, err.value.param) == ("invalid_value", "max_output_tokens")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input=QUESTION)
    # store is accepted and never honoured: nothing to fetch back later
    r = client.responses.create(model="demo-a", input=QUESTION, max_output_tokens=2, store=True)
    assert r.model == "demo-a"


def test_a_keys_max_tokens_bounds_max_output_tokens(keyed: str) -> None:
    with openai.OpenAI(base_url=keyed + "/v1", api_key=KEY_A, max_retries=0) as client:
        r = client.responses.create(model="demo-a", input=QUESTION, temperature=0)
        assert r.model == "demo-a" and r.max_output_tokens == 3
        assert r.usage is not None and r.usage.output_tokens == 3
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="demo-a", input=QUESTION, max_output_tokens=4)
        assert (err.value.code, err.value.param) == ("max_tokens_over_key_limit", "max_output_tokens")
        with pytest.raises(openai.PermissionDeniedError):
            client.responses.create(model="demo-b", input=QUESTION, max_output_tokens=2)


# The arguments of the tool and the answer of the structured output alike.
QUERY_SCHEMA = {
    "type": "object",
    "properties": {
        "table": {"type": "string", "enum": ["users", "orders"]},
        "min_age": {"type": "integer"},
    },
    "required": ["table", "min_age"],
    "additionalProperties": False,
}


# -- chat: tools and response_format

COUNT_USERS = {
    "type": "function",
    "function": {
        "name": "count_users",
        "description": "Count the rows of a table whose age is above min_age.",
        "strict": True,  # vLLM constrains the arguments to `parameters` only for strict tools
        "parameters": QUERY_SCHEMA,
    },
}


def _valid_arguments(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"table", "min_age"}, args
    assert args["table"] in ("users", "orders") and isinstance(args["min_age"], int)


@pytest.mark.parametrize("model", [BASE, "demo-a"])
def test_a_named_tool_choice_calls_that_function(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        tools=[COUNT_USERS],
        tool_choice={"type": "function", "function": {"name": "count_users"}},
        max_tokens=100,
        temperature=0,
    )
    assert r.model == model
    calls = r.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1 and calls[0].function.name == "count_users"
    _valid_arguments(calls[0].function.arguments)


def test_required_tool_choice_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="demo-a",
        messages=MESSAGES,
        tools=[COUNT_USERS],
        tool_choice="required",
        max_tokens=100,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert all(c.model == "demo-a" for c in chunks)
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas and deltas[0].function is not None and deltas[0].function.name == "count_users"
    _valid_arguments("".join(d.function.arguments or "" for d in deltas if d.function is not None))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_auto_tool_choice_answers(client: openai.OpenAI) -> None:
    """`auto` needs vLLM's --enable-auto-tool-choice (else a 400); the tiny model then answers in text."""
    r = client.chat.completions.create(
        model="demo-a", messages=MESSAGES, tools=[COUNT_USERS], max_tokens=16, temperature=0
    )
    message = r.choices[0].message
    assert message.content or message.tool_calls


QUERY_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "query",
        "strict": True,
        "schema": QUERY_SCHEMA,
    },
}


@pytest.mark.parametrize("model", [BASE, "demo-a"])
def test_response_format_json_schema_gives_that_json(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        response_format=QUERY_SCHEMA,  # type: ignore[arg-type]
        max_tokens=100,
        temperature=0,
    )
    assert r.model == model and r.choices[0].finish_reason == "stop"
    _valid_arguments(r.choices[0].message.content or "")


def test_response_format_json_object_gives_json(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=BASE, messages=MESSAGES, response_format={"type": "json_object"}, max_tokens=100, temperature=0
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
