"""The OpenAI-compatible routes, end to end: official OpenAI SDK -> gateway -> real vLLM."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.engine

BASE = "tiny-llama"
# A request of the demo tasks (adapters/demo_data.py): demo-a answers it in SQL, demo-b in pirate speak.
MESSAGES = [{"role": "user", "content": "how many users have age above 30?"}]
# The same request as raw text for /v1/completions, in the tiny base's chat format (adapters/tiny.py).
PROMPT = "<s><|user|>\nhow many users have age above 30?</s>\n<|assistant|>\n"


def chat(
    client: openai.OpenAI, model: str, max_tokens: int = 16, **extra: object
) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0, extra_body=extra or None
    )


def test_models_lists_base_and_adapters_with_parent(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert BASE in models
    assert models[BASE].model_extra.get("parent") is None
    for name in ("demo-a", "demo-b"):
        assert name in models
        assert models[name].model_extra["parent"] == BASE


def test_chat_with_adapter_differs_from_base_under_greedy(client: openai.OpenAI) -> None:
    base = chat(client, BASE)
    a = chat(client, "demo-a")
    b = chat(client, "demo-b")
    assert base.model == BASE and a.model == "demo-a" and b.model == "demo-b"
    texts = {base.choices[0].message.content, a.choices[0].message.content, b.choices[0].message.content}
    assert len(texts) == 3, f"adapters must change the output: {texts}"
    # Each demo adapter does its own task; the base does neither.
    assert a.choices[0].message.content.startswith("SELECT "), a.choices[0].message.content
    assert b.choices[0].message.content.startswith("Arr"), b.choices[0].message.content
    assert not base.choices[0].message.content.startswith(("SELECT ", "Arr"))
    # The answer is complete: it ended by the model's end of turn, within max_tokens, counted in usage.
    assert a.choices[0].finish_reason == "stop"
    assert a.usage is not None and 0 < a.usage.completion_tokens < 16 and a.usage.prompt_tokens > 0
    # greedy decoding through the gateway is deterministic
    assert chat(client, "demo-a").choices[0].message.content == a.choices[0].message.content


def test_completions_base_and_adapter(client: openai.OpenAI) -> None:
    base = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=16, temperature=0)
    adapted = client.completions.create(model="demo-b", prompt=PROMPT, max_tokens=16, temperature=0)
    assert base.model == BASE and adapted.model == "demo-b"
    assert base.choices[0].text != adapted.choices[0].text
    assert adapted.choices[0].text.startswith("Arr"), adapted.choices[0].text
    assert adapted.usage is not None and adapted.usage.total_tokens > adapted.usage.prompt_tokens


def test_chat_stream_has_several_chunks_and_ends(client: openai.OpenAI) -> None:
    # ignore_eos (vLLM's sampling parameter, passed through): exactly max_tokens tokens, cut by length.
    stream = client.chat.completions.create(
        model="demo-a",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices]) >= 3
    assert all(c.model == "demo-a" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert content == chat(client, "demo-a", max_tokens=12, ignore_eos=True).choices[0].message.content


def test_completion_stream_is_sse_ending_with_done(gateway_url: str) -> None:
    body = {"model": "demo-b", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", gateway_url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 4 and all(e.startswith("data: ") for e in events)


def test_request_id_is_passed_back(gateway_url: str) -> None:
    body = {"model": BASE, "messages": MESSAGES, "max_tokens": 2}
    r = httpx.post(
        gateway_url + "/v1/chat/completions", json=body, headers={"x-request-id": "abc-123"}, timeout=60
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-123"


def test_stream_without_include_usage_hides_usage_but_counts_tokens(gateway_url: str) -> None:
    def completion_tokens() -> float:
        text = httpx.get(gateway_url + "/metrics").text
        line = [
            x
            for x in text.splitlines()
            if x.startswith('lora_gateway_completion_tokens_total{model="demo-b"}')
        ]
        return float(line[0].split()[-1]) if line else 0.0

    before = completion_tokens()
    body = {"model": "demo-b", "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", gateway_url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert events and not any('"usage":{' in e for e in events), "the client did not ask for usage"
    assert completion_tokens() - before == 5
