"""`loadtest.harness.verify` as pure logic: request identity, references with runner-up tokens, verdicts."""

from __future__ import annotations

import json

from loadtest.harness.verify import Reference, References, Step, reference_body, request_key, steps_from

BODY = {
    "model": "sql",
    "messages": [{"role": "user", "content": "list all"}],
    "max_tokens": 8,
    "temperature": 0,
}


def test_a_request_is_identified_without_its_model_and_streaming() -> None:
    streamed = {**BODY, "model": "chat", "stream": True, "stream_options": {"include_usage": True}}
    assert request_key(BODY) == request_key(json.dumps(streamed).encode())
    assert request_key(BODY) != request_key({**BODY, "max_tokens": 9})


def test_the_learning_request_asks_for_the_runner_up_and_does_not_stream() -> None:
    chat = reference_body(json.dumps({**BODY, "stream": True, "stream_options": {}}).encode())
    assert chat["logprobs"] is True and chat["top_logprobs"] == 5 and "stream" not in chat
    assert reference_body({"model": "m", "prompt": "x"})["logprobs"] == 5


def test_steps_from_chat_and_completions_logprobs() -> None:
    chat = {"logprobs": {"content": [
        {"token": "SELECT", "logprob": -0.1, "top_logprobs": [{"token": "SELECT", "logprob": -0.1},
                                                              {"token": "WITH", "logprob": -2.1}]},
    ]}}  # fmt: skip
    [step] = steps_from(chat)
    assert step.token == "SELECT" and step.alt == "WITH" and abs(step.gap - 2.0) < 1e-9
    completions = {"logprobs": {"tokens": [" a", "</s>"], "token_logprobs": [-0.5, -0.01],
                                "top_logprobs": [{" a": -0.5, " b": -0.52}, {"</s>": -0.01}]}}  # fmt: skip
    a, end = steps_from(completions)
    assert a.alt == " b" and abs(a.gap - 0.02) < 1e-9
    assert end.alt is None and end.gap == float("inf")


REF = Reference(
    " rating < 20;", (Step(" rating", " salary", 0.01), Step(" <", " >", 3.0), Step(" 20;", None, 9))
)


def test_a_flip_at_a_near_tie_is_not_wrong_but_a_flip_where_the_reference_was_sure_is() -> None:
    assert REF.near_tie(" salary < 20;")
    assert not REF.near_tie(" rating > 20;"), "the reference was 3 nats sure of ' <'"
    assert not REF.near_tie(" price < 20;"), "not the runner-up"
    assert not Reference(" rating", (Step(" rating", " salary", 0.2),)).near_tie(" salary"), "0.2 > 0.1 nats"
    third = Reference(" rating", (Step(" rating", " salary", 0.01, ((" price", 0.03), (" city", 0.5))),))
    assert third.near_tie(" price"), "a third candidate within 0.1 nats is a tie too"
    assert not third.near_tie(" city")


def test_verdicts_are_counted_per_model_and_name_the_model_an_answer_came_from() -> None:
    refs = References()
    refs.add("base", "k", "users")
    refs.add("sql", "k", "SELECT")
    refs.add("sql", "k2", REF)
    refs.add("pirate", "k", "Arr")
    level = refs.fresh()
    assert level.check("sql", "k", "SELECT").ok
    wrong = level.check("base", "k", "Arr")
    assert not wrong.ok and wrong.as_model == "pirate"
    assert level.check("base", "k", "gibberish").as_model is None
    tie = level.check("sql", "k2", " salary < 20;")
    assert tie.near_tie and not tie.ok
    s = level.summary()
    assert (s["checked"], s["wrong"], s["wrong_model"], s["near_ties"]) == (4, 2, 1, 1)
    assert s["per_model"]["base"] == {"checked": 2, "right": 0, "near_ties": 0, "wrong": 2,
                                      "as_model": {"pirate": 1}}  # fmt: skip
    assert refs.fresh().summary()["checked"] == 0, "each level counts from zero over the same references"


def test_special_tokens_take_no_room_and_the_last_one_is_where_the_reference_stopped() -> None:
    # with ignore_eos the model goes on after </s>, which the detokenizer leaves out of the text
    ref = Reference(
        " a b", (Step(" a", None, 9), Step("</s>", " x", 4), Step(" b", " c", 0.01), Step("</s>", " d", 0.02))
    )
    assert not ref.near_tie(" a b x"), "after the final </s> only its runner-up ' d' is a tie"
    assert ref.near_tie(" a c"), "' c' was the runner-up of ' b' by 0.01 nats"
    assert ref.near_tie(" a b d"), "the answer went on with the runner-up of the final stop"
    stops = Reference(" a b", (Step(" a", None, 9), Step(" b", "</s>", 0.01), Step("</s>", None, 9)))
    assert stops.near_tie(" a"), "stopping was the runner-up of ' b'"
    assert not stops.near_tie(" a z")


def test_with_token_ids_an_answer_is_judged_token_by_token() -> None:
    """`80` and `8` + `0` read the same: only the ids show where an answer took the runner-up."""
    steps = (Step("token_id:7", "token_id:8", 0.01), Step("token_id:9", "token_id:4", 3.0))
    refs = References()
    refs.add("sql", "k", Reference(" 80 rows", steps, (7, 9)))
    refs.add("chat", "k", Reference(" 80 chats", (), (5, 5)))
    assert refs.judge("sql", "k", "ignored", [7, 9]).ok
    assert refs.judge("sql", "k", " 80 rows", [8, 9]).near_tie, "the runner-up by 0.01 nats, same text"
    assert not refs.judge("sql", "k", " 80 rows", [7, 4]).near_tie, "the reference was 3 nats sure"
    assert refs.judge("sql", "k", " 80 chats", [5, 5]).as_model == "chat"
    body = reference_body({"model": "m", "prompt": "x", "return_token_ids": True})
    assert body["return_tokens_as_token_ids"] is True
