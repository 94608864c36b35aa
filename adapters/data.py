"""JSONL training data: load a file, detect its format, validate every line.

Three formats are recognised from the first record, then every line is checked against it:

- ``prompt_completion``: ``{"prompt": str, "completion": str}`` (raw text, the completions API);
- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` ending with an
  assistant turn (the chat API: the chat template is applied, loss on the last assistant turn);
- ``preference``: ``{"prompt": str, "chosen": str, "rejected": str}`` (for ``--method dpo``).

Blank lines are skipped. Anything else (invalid JSON, a missing field, a wrong type, an empty file)
raises `DatasetError`, whose message starts with ``path:line:``. No heavy imports here: `load_jsonl`
is plain Python; `to_trl_rows` shapes the rows the way TRL's trainers expect them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Format = Literal["prompt_completion", "chat", "preference"]
ROLES = ("system", "user", "assistant")

#: Required fields of the flat formats, in the order they are checked.
_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
}


class DatasetError(ValueError):
    """A dataset file that cannot be used; `line` is 1-based, or None for the whole file."""

    def __init__(self, path: Path | str, line: int | None, reason: str) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else f"{self.path}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class JsonlDataset:
    """A validated dataset: its rows, detected format and the facts a training report records."""

    path: Path
    format: Format
    rows: list[dict[str, Any]] = field(repr=False)
    sha256: str
    lines: int

    @property
    def examples(self) -> int:
        return len(self.rows)

    def describe(self) -> dict[str, Any]:
        """The JSON-ready summary written into `training_report.json`."""
        return {
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "format": self.format,
            "examples": self.examples,
            "lines": self.lines,
        }


def detect_format(record: Any) -> Format | None:
    """The format a record belongs to, from its keys (None when no format matches)."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if {"chosen", "rejected"} & record.keys():
        return "preference"
    if {"prompt", "completion"} & record.keys():
        return "prompt_completion"
    return None


def load_jsonl(path: Path | str) -> JsonlDataset:
    """Read and validate a JSONL dataset; raise `DatasetError` naming the file and line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, None, "no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DatasetError(path, line, "not valid UTF-8") from exc
    fmt: Format | None = None
    rows: list[dict[str, Any]] = []
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(path, number, f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if fmt is None:
            fmt = detect_format(record)
            if fmt is None:
                raise DatasetError(path, number, _unknown(record))
        rows.append(_validate(path, number, record, fmt))
    if fmt is None:
        raise DatasetError(path, None, "empty dataset (no JSON lines)")
    return JsonlDataset(path, fmt, rows, hashlib.sha256(raw).hexdigest(), len(lines))


def _unknown(record: Any) -> str:
    if not isinstance(record, dict):
        return f"expected a JSON object, got {_kind(record)}"
    keys = ", ".join(sorted(record)) or "none"
    return (
        f"unknown record format (keys: {keys}); expected prompt/completion, messages, "
        "or prompt/chosen/rejected"
    )


def _validate(path: Path, number: int, record: Any, fmt: Format) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DatasetError(path, number, f"expected a JSON object, got {_kind(record)}")
    if fmt == "chat":
        return {"messages": _validate_messages(path, number, record)}
    out: dict[str, Any] = {}
    for name in _FIELDS[fmt]:
        if name not in record:
            raise DatasetError(path, number, f"missing field '{name}' (format {fmt} detected from line 1)")
        value = record[name]
        if not isinstance(value, str):
            raise DatasetError(path, number, f"field '{name}' must be a string, got {_kind(value)}")
        out[name] = value
    return out


def _validate_messages(path: Path, number: int, record: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" not in record:
        raise DatasetError(path, number, "missing field 'messages' (format chat detected from line 1)")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DatasetError(path, number, f"field 'messages' must be a non-empty list, got {_kind(messages)}")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DatasetError(path, number, f"{where} must be an object, got {_kind(message)}")
        for name in ("role", "content"):
            if name not in message:
                raise DatasetError(path, number, f"{where}: missing field '{name}'")
            if not isinstance(message[name], str):
                raise DatasetError(
                    path, number, f"{where}: field '{name}' must be a string, got {_kind(message[name])}"
                )
        if message["role"] not in ROLES:
            raise DatasetError(path, number, f"{where}: role must be one of {', '.join(ROLES)}")
        out.append({"role": message["role"], "content": message["content"]})
    if out[-1]["role"] != "assistant":
        raise DatasetError(path, number, "the last message must have role 'assistant' (the target)")
    return out


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, int | float) else type(value).__name__
    )


def split_prompt(row: dict[str, Any], fmt: Format) -> tuple[Any, str]:
    """(prompt, reference completion) of a row: the prompt is a string or a list of chat messages."""
    if fmt == "chat":
        return row["messages"][:-1], row["messages"][-1]["content"]
    if fmt == "preference":
        return row["prompt"], row["chosen"]
    return row["prompt"], row["completion"]


def to_trl_rows(dataset: JsonlDataset) -> list[dict[str, Any]]:
    """Rows in the shape TRL expects: chat becomes conversational prompt/completion (loss on the answer)."""
    if dataset.format == "chat":
        return [{"prompt": row["messages"][:-1], "completion": [row["messages"][-1]]} for row in dataset.rows]
    return [dict(row) for row in dataset.rows]
