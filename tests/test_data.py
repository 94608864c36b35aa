"""JSONL datasets: format detection, and errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.data import DatasetError, load_jsonl, split_prompt, to_trl_rows


def write(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"prompt": "2+2=", "completion": "4"}, "prompt_completion"),
        (CHAT, "chat"),
        ({"prompt": "p", "chosen": "good", "rejected": "bad"}, "preference"),
    ],
)
def test_formats_are_detected_and_reported(tmp_path: Path, record: dict, fmt: str) -> None:
    data = load_jsonl(write(tmp_path / "d.jsonl", record, "", record))
    assert data.format == fmt
    assert data.examples == 2 and data.lines == 3  # the blank line is skipped
    described = data.describe()
    assert described["format"] == fmt and described["examples"] == 2 and len(described["sha256"]) == 64


def test_chat_becomes_conversational_prompt_completion(tmp_path: Path) -> None:
    system = {"role": "system", "content": "be brief"}
    record = {"messages": [system, *CHAT["messages"]]}
    data = load_jsonl(write(tmp_path / "chat.jsonl", record))
    (row,) = to_trl_rows(data)
    assert row["prompt"] == [system, {"role": "user", "content": "hi"}]
    assert row["completion"] == [{"role": "assistant", "content": "hello"}]
    assert split_prompt(data.rows[0], "chat") == (row["prompt"], "hello")


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ('{"prompt": "a", "completion": ', "invalid JSON"),
        ({"prompt": "a"}, "missing field 'completion'"),
        ({"prompt": "a", "completion": 4}, "field 'completion' must be a string, got number"),
        (["a", "b"], "expected a JSON object, got array"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path: Path, second_line: object, message: str) -> None:
    path = write(tmp_path / "bad.jsonl", {"prompt": "ok", "completion": "ok"}, "", second_line)
    with pytest.raises(DatasetError, match=message) as info:
        load_jsonl(path)
    assert info.value.line == 3
    assert str(info.value).startswith(f"{path}:3: ")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\]: missing field 'content'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role must be one of"),
        ({"messages": [{"role": "user", "content": "x"}]}, "last message must have role 'assistant'"),
        ({"prompt": "p", "chosen": "c", "rejected": None}, "field 'rejected' must be a string, got null"),
        ({"question": "q", "answer": "a"}, "unknown record format"),
    ],
)
def test_invalid_records(tmp_path: Path, record: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as info:
        load_jsonl(write(tmp_path / "bad.jsonl", record))
    assert info.value.line == 1


def test_a_line_of_another_format_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "mixed.jsonl", CHAT, {"prompt": "p", "completion": "c"})
    with pytest.raises(DatasetError, match="missing field 'messages'") as info:
        load_jsonl(path)
    assert info.value.line == 2


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match="empty dataset") as info:
        load_jsonl(path)
    assert info.value.line is None and str(path) in str(info.value)


def test_missing_file_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok", "completion": "ok"}\n{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(DatasetError, match="not valid UTF-8") as info:
        load_jsonl(path)
    assert info.value.line == 2
