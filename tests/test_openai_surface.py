"""The rest of the OpenAI surface, without an engine: the Responses API's events rewritten for the client
(model put back, usage read from `response.completed`), its usage names mapped to the gateway's, its body
validated (stateful fields refused, `max_output_tokens` capped, never stored), and the tool-call flags of
a managed vLLM. End to end: tests/test_openai_surface_e2e.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.api.openai import check_limits, validate
from gateway.api.schemas import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from gateway.engines.managed import vllm_command
from gateway.errors import InvalidRequestError
from gateway.proxy import (
    ResponsesSseRewriter,
    SseRewriter,
    responses_body_usage,
    responses_event_usage,
    responses_usage,
)
from gateway.serving import cap_max_tokens
from gateway.settings import EngineSettings, Settings
from tests.test_proxy import run as proxy_run

USAGE = {
    "input_tokens": 15,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 6,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 21,
}
COUNTED = {"prompt_tokens": 15, "completion_tokens": 6, "total_tokens": 21}


def response(status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "model": "lora-abc",
        "object": "response",
        "output": [],
        "status": status,
        "usage": usage,
    }


def event(kind: str, obj: dict[str, Any]) -> bytes:
    """One event as vLLM writes it: its type line, then compact JSON."""
    data = json.dumps({**obj, "type": kind}, separators=(",", ":")).encode()
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


STREAM = (
    event("response.created", {"response": response("in_progress", None), "sequence_number": 0})
    + event("response.in_progress", {"response": response("in_progress", None), "sequence_number": 1})
    + event("response.output_text.delta", {"delta": 'a "model":"lora-abc" trap', "sequence_number": 2})
    + event("response.output_text.delta", {"delta": ' "usage":{ trap', "sequence_number": 3})
    + event("response.completed", {"response": response("completed", USAGE), "sequence_number": 4})
)


def run(rewriter: SseRewriter, cuts: list[int]) -> bytes:
    return proxy_run(rewriter, cuts, STREAM)


def test_responses_events_get_the_clients_model_and_give_their_usage_across_any_cut() -> None:
    expected = STREAM.replace(b'"model":"lora-abc"', b'"model":"sql"')
    assert expected.count(b'"model":"sql"') == 3  # created, in_progress, completed; not the delta's text
    for cut in range(1, len(STREAM)):
        rewriter = ResponsesSseRewriter("lora-abc", "sql")
        assert run(rewriter, [cut]) == expected
        assert rewriter.usage == COUNTED


def test_responses_stream_with_the_same_name_passes_through_and_still_counts() -> None:
    rewriter = ResponsesSseRewriter("tiny-llama", "tiny-llama")
    same = STREAM.replace(b"lora-abc", b"tiny-llama")
    out = rewriter.feed(same[:100]) + rewriter.feed(same[100:]) + rewriter.flush()
    assert out == same and rewriter.usage == COUNTED


def test_the_chat_rewriter_does_not_read_responses_events() -> None:
    """The chat/completions relay is untouched: it knows `data: {...}` events only (hence the subclass)."""
    rewriter = SseRewriter("lora-abc", "sql")
    run(rewriter, [])
    assert rewriter.usage is None


def test_responses_usage_in_the_gateways_names() -> None:
    assert responses_usage(USAGE) == COUNTED
    assert responses_usage(None) is None
    assert responses_event_usage(event("response.completed", {"response": response("completed", USAGE)})) == (
        COUNTED
    )
    assert responses_event_usage(event("response.created", {"response": response("x", None)})) is None
    assert responses_event_usage(b"event: response.completed\ndata: {broken") is None
    assert responses_event_usage(b"no data line") is None
    body = json.dumps(response("completed", USAGE), separators=(",", ":")).encode()
    assert responses_body_usage(body) == COUNTED
    assert responses_body_usage(b'{"id":"x"}') is None


def _refused(payload: dict[str, Any]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as err:
        validate(payload, ResponsesRequest)
    return err.value


@pytest.mark.parametrize(
    ("field", "value"),
    [("previous_response_id", "resp_1"), ("background", True), ("conversation", "conv_1")],
)
def test_stateful_responses_fields_are_refused(field: str, value: Any) -> None:
    err = _refused({"model": "m", "input": "hi", field: value})
    assert (err.status_code, err.code, err.param) == (400, "unsupported_parameter", field)
    assert "not supported by this gateway" in err.message


def test_responses_body_validation() -> None:
    ok = validate({"model": "m", "input": "hi", "background": False, "store": True}, ResponsesRequest)
    assert isinstance(ok, ResponsesRequest) and ok.unsupported() is None
    assert _refused({"model": "m"}).param == "input"
    assert _refused({"model": "m", "input": []}).param == "input"
    assert _refused({"model": "m", "input": "hi", "max_output_tokens": 0}).param == "max_output_tokens"
    assert _refused({"model": "m", "input": "hi", "stream": "yes"}).param == "stream"


def test_responses_are_never_stored() -> None:
    for sent in ({}, {"store": True}, {"store": None}):
        payload = {"model": "m", "input": "hi", **sent}
        assert ResponsesRequest.model_validate(payload).prepare(payload) is True
        assert payload["store"] is False
    payload = {"model": "m", "input": "hi", "store": False}
    assert ResponsesRequest.model_validate(payload).prepare(payload) is False  # the body stays as sent
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionRequest.model_validate(chat).prepare(chat) is False and "store" not in chat


def test_max_output_tokens_is_capped_like_max_tokens(tmp_path: Any) -> None:
    settings = Settings(cache_dir=tmp_path, data_dir=tmp_path, max_output_tokens=100)
    check_limits(
        ResponsesRequest.model_validate({"model": "m", "input": "x", "max_output_tokens": 100}), settings
    )
    with pytest.raises(InvalidRequestError) as err:
        check_limits(
            ResponsesRequest.model_validate({"model": "m", "input": "x", "max_output_tokens": 101}), settings
        )
    assert (err.value.param, err.value.code) == ("max_output_tokens", "invalid_value")
    with pytest.raises(InvalidRequestError) as err:  # chat and text completions as before
        check_limits(
            CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": 101}), settings
        )
    assert err.value.param == "max_tokens"


def test_a_keys_max_tokens_bounds_max_output_tokens() -> None:
    payload: dict[str, Any] = {"model": "m", "input": "x"}
    assert cap_max_tokens(ResponsesRequest.model_validate(payload), payload, 8, "team") is True
    assert payload["max_output_tokens"] == 8 and "max_tokens" not in payload
    asked = {"model": "m", "input": "x", "max_output_tokens": 8}
    assert cap_max_tokens(ResponsesRequest.model_validate(asked), asked, 8, "team") is False
    over = {"model": "m", "input": "x", "max_output_tokens": 9}
    with pytest.raises(InvalidRequestError) as err:
        cap_max_tokens(ResponsesRequest.model_validate(over), over, 8, "team")
    assert (err.value.param, err.value.code) == ("max_output_tokens", "max_tokens_over_key_limit")
    chat: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert cap_max_tokens(ChatCompletionRequest.model_validate(chat), chat, 8, "team") is True
    assert chat["max_tokens"] == 8


def test_chat_tools_and_response_format_pass_through_validation() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    payload = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "response_format": {"type": "json_object"},
    }
    parsed = validate(payload, ChatCompletionRequest)
    assert parsed.model_extra == {k: payload[k] for k in ("tools", "tool_choice", "response_format")}


def test_a_tool_call_parser_turns_on_vllms_tool_choice() -> None:
    assert "--tool-call-parser" not in vllm_command(EngineSettings(), "/models/base", "base")
    cmd = vllm_command(EngineSettings(tool_call_parser="hermes"), "/models/base", "base")
    at = cmd.index("--tool-call-parser")
    assert cmd[at + 1] == "hermes" and "--enable-auto-tool-choice" in cmd
