"""The demo tasks' generated datasets: deterministic, shipped in sync, held-out requests never trained on."""

from __future__ import annotations

import json
from pathlib import Path

from adapters.data import load_jsonl
from adapters.demo_data import (
    COLUMNS,
    NUMBERS,
    TABLES,
    TASKS,
    base_corpus,
    shipped_datasets_dir,
    split_requests,
    write_demo_datasets,
)


def test_shipped_datasets_match_the_generator(tmp_path: Path) -> None:
    written = write_demo_datasets(tmp_path)
    shipped = shipped_datasets_dir()
    for key, path in written.items():
        assert (shipped / path.relative_to(tmp_path)).read_bytes() == path.read_bytes(), f"{key} is stale"


def test_splits_are_disjoint_and_tasks_share_requests() -> None:
    shipped = shipped_datasets_dir()
    prompts = {}
    for task in TASKS:
        train = load_jsonl(shipped / task / "train.jsonl")
        held = load_jsonl(shipped / task / "held_out.jsonl")
        assert train.format == held.format == "chat"
        train_q = {r["messages"][0]["content"] for r in train.rows}
        held_q = {r["messages"][0]["content"] for r in held.rows}
        assert not train_q & held_q and len(held_q) == held.examples
        prompts[task] = held_q
    assert prompts["sql"] == prompts["pirate"]
    prefs = load_jsonl(shipped / "dpo" / "preference.jsonl")
    assert prefs.format == "preference" and all(r["chosen"] != r["rejected"] for r in prefs.rows)


def test_answers_differ_between_tasks() -> None:
    (request,) = split_requests(train=1, held_out=0)["train"]
    assert request.render("sql").startswith("SELECT") and request.render("pirate").startswith("Arr")


def test_base_corpus_never_pairs_a_request_with_its_answer() -> None:
    docs = base_corpus(2000, seed=1)
    for kind, content in docs:
        if kind == "chat":
            answer = content[-1]["content"]
            assert not answer.startswith(("SELECT", "Arr")), "the demo mappings are left to the adapters"
        else:
            assert isinstance(content, str)
    assert {kind for kind, _ in docs} == {"text", "chat"}


def test_domain_words_are_single_tokens(cache_dir: Path) -> None:
    from transformers import AutoTokenizer

    from adapters.tiny import build_tiny

    tok = AutoTokenizer.from_pretrained(build_tiny(cache_dir))
    words = [*TABLES, *COLUMNS, *(str(n) for n in NUMBERS)]
    split = [w for w in words if len(tok(" " + w, add_special_tokens=False)["input_ids"]) != 1]
    assert not split, f"split into several tokens: {split}"
    assert json.loads((build_tiny(cache_dir) / "build_info.json").read_text())["pretrain_steps"] > 0
