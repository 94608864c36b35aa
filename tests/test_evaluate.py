"""Held-out evaluation: the scores, the in-process base-vs-adapter comparison, and the endpoint client."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from adapters.data import load_jsonl
from adapters.evaluate import (
    compare_base_adapter,
    completion_loss,
    evaluate_endpoint,
    evaluate_model,
    exact_match,
    score_generations,
    token_f1,
)


@pytest.fixture(scope="session")
def tiny_base(cache_dir: Path) -> Path:
    from adapters.tiny import build_tiny

    return build_tiny(cache_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_scores() -> None:
    assert exact_match("  SELECT 1; \n", "SELECT 1;")
    assert not exact_match("SELECT 2;", "SELECT 1;")
    assert token_f1("SELECT * FROM users;", "SELECT * FROM users;") == 1.0
    assert token_f1("a b c", "x y z") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "a") == 0.0
    # "SELECT * FROM orders ;" vs "SELECT * FROM users ;": 4 of 5 tokens shared.
    assert token_f1("SELECT * FROM orders;", "SELECT * FROM users;") == pytest.approx(0.8)
    assert score_generations(["a", "b"], ["a", "c"]) == (0.5, 0.5)


def test_endpoint_chat_and_completions_greedy(tmp_path: Path) -> None:
    seen: list[tuple[str, dict, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, body, request.headers.get("authorization")))
        if request.url.path.endswith("/chat/completions"):
            answer = {"hi": " hello ", "bye": "ciao"}[body["messages"][-1]["content"]]
            return httpx.Response(
                200, json={"choices": [{"message": {"role": "assistant", "content": answer}}]}
            )
        return httpx.Response(200, json={"choices": [{"text": "4"}]})

    transport = httpx.MockTransport(handler)
    data = load_jsonl(write_jsonl(tmp_path / "chat.jsonl", [chat("hi", "hello"), chat("bye", "goodbye")]))
    result = evaluate_endpoint("http://gw:8000", "demo-sql", data, api_key="k", transport=transport)
    assert result.exact_match == 0.5 and result.examples == 2 and result.loss is None
    path, body, auth = seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k"
    assert body["model"] == "demo-sql" and body["temperature"] == 0.0
    assert body["messages"] == [{"role": "user", "content": "hi"}]

    seen.clear()
    raw = load_jsonl(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}]))
    result = evaluate_endpoint("http://gw:8000/v1/", "tiny-llama", raw, transport=transport)
    assert result.exact_match == 1.0 and seen[0][0] == "/v1/completions" and seen[0][1]["prompt"] == "2+2="


def test_endpoint_errors_are_raised(tmp_path: Path) -> None:
    transport = httpx.MockTransport(
        lambda r: httpx.Response(404, json={"error": {"message": "no such model"}})
    )
    data = load_jsonl(write_jsonl(tmp_path / "chat.jsonl", [chat("hi", "hello")]))
    with pytest.raises(httpx.HTTPStatusError):
        evaluate_endpoint("http://gw", "nope", data, transport=transport)


def test_completion_loss_counts_only_the_answer(tiny_base: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    prompt = [{"role": "user", "content": "how many users are there?"}]
    loss = completion_loss(model, tok, [(prompt, "SELECT COUNT(*) FROM users;")])
    prefix = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(
        [*prompt, {"role": "assistant", "content": "SELECT COUNT(*) FROM users;"}], tokenize=False
    )
    p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
    labels = ids.clone()
    labels[0, : len(p_ids)] = -100
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss.item()
    assert loss == pytest.approx(expected, rel=1e-4)


def test_base_vs_adapter_side_by_side(tiny_base: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    rows = [chat("how many users are there?", "SELECT COUNT(*) FROM users;"), chat("list all books.", "x")]
    data = load_jsonl(write_jsonl(tmp_path / "held.jsonl", rows))

    result = evaluate_model(peft_model, tok, data, max_new_tokens=8)
    assert result.examples == 2 and result.perplexity == pytest.approx(math.exp(result.loss))
    assert 0.0 <= result.exact_match <= 1.0 and 0.0 <= result.token_f1 <= 1.0
    assert result.samples[0]["reference"] == "SELECT COUNT(*) FROM users;"

    # A fresh LoRA adapter is a no-op (B = 0): base and adapter agree; then make it differ.
    side = compare_base_adapter(peft_model, tok, data, max_new_tokens=8)
    assert side["base"]["loss"] == pytest.approx(side["adapter"]["loss"], abs=1e-6)
    import torch

    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    side = compare_base_adapter(peft_model, tok, data, generate=False)
    assert side["base"]["loss"] != pytest.approx(side["adapter"]["loss"], abs=1e-3)
    assert side["base"]["exact_match"] is None
