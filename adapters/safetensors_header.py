"""Read a safetensors header without torch and without touching (or trusting) the tensor data.

Layout: 8-byte little-endian header length `n`, then `n` bytes of JSON mapping tensor names to
`{"dtype", "shape", "data_offsets": [begin, end]}` (plus an optional `__metadata__` of strings), then
the data section. The checks mirror the `safetensors` library's own: known dtypes, byte counts that
match the shapes, offsets that tile the data section exactly, no duplicate keys.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

MAX_HEADER_BYTES = 100_000_000  # the format's own limit

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class SafetensorsHeaderError(ValueError):
    """The file is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]


def read_header(f: BinaryIO) -> dict[str, TensorInfo]:
    """Parse and check the header of the open file `f` (positioned at its start)."""
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise SafetensorsHeaderError("shorter than 8 bytes")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise SafetensorsHeaderError(f"header length {n} does not fit a {size}-byte file")
    raw = f.read(n)
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("it does not start with '{'")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise SafetensorsHeaderError(f"header is not a JSON object ({exc})") from None
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsHeaderError("__metadata__ must map strings to strings")
    tensors = {key: _tensor_info(key, entry) for key, entry in header.items()}
    end = 0
    for info in sorted(tensors.values(), key=lambda t: t.data_offsets):
        if info.data_offsets[0] != end:
            raise SafetensorsHeaderError("tensor data offsets overlap or leave holes")
        end = info.data_offsets[1]
    if end != size - 8 - n:
        raise SafetensorsHeaderError(f"tensors cover {end} bytes but the data section has {size - 8 - n}")
    return tensors


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key")
    return dict(pairs)


def _tensor_info(key: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise SafetensorsHeaderError(f"entry {key!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise SafetensorsHeaderError(f"tensor {key!r} has unknown dtype {dtype!r}")
    if not all(isinstance(v, list) and all(type(i) is int and i >= 0 for i in v) for v in (shape, offsets)):
        raise SafetensorsHeaderError(f"tensor {key!r} has a malformed shape or data_offsets")
    if len(offsets) != 2 or offsets[1] < offsets[0]:
        raise SafetensorsHeaderError(f"tensor {key!r} has malformed data_offsets")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise SafetensorsHeaderError(
            f"tensor {key!r} has {offsets[1] - offsets[0]} bytes for shape {shape} {dtype}"
        )
    return TensorInfo(dtype, tuple(shape), (offsets[0], offsets[1]))
