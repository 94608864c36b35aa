"""Check a PEFT LoRA adapter folder against the served base before anything reaches vLLM.

No torch and nothing is ever unpickled: `adapter_config.json` is read as JSON and tensor shapes come
from the safetensors header (8-byte little-endian length, then a JSON object). Each refusal is an
`AdapterValidationError` whose `code` is stable:

    invalid_name     name outside `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`, or reserved
    missing_file     no adapter_config.json / adapter_model.safetensors (or not a folder)
    unsafe_file      a pickle-capable or code file is present (.bin .pt .pth .pkl .ckpt .py ...)
    too_large        the files that would be stored exceed `max_bytes`
    bad_config       adapter_config.json is not JSON, or a field is missing or of the wrong type
    not_lora         peft_type is not LORA
    unsupported      DoRA, modules_to_save, bias, rank/alpha patterns, non-float or non-LoRA tensors
    rank_too_large   r > max_rank (the engine's --max-lora-rank)
    base_mismatch    base_model_name_or_path is not the served base (unless forced)
    unknown_module   a target module or a tensor's module does not exist in the base
    shape_mismatch   a tensor's shape, rank or layer index does not fit the base
    bad_safetensors  the safetensors header is malformed, or holds no LoRA tensor

`param` names what is wrong: a config field (`r`, `target_modules`, ...), a file name, or `name`.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from adapters.llama import ATTENTION_MODULES, BLOCKS, LINEAR_MODULES, MLP_MODULES, linear_shapes
from adapters.safetensors_header import SafetensorsHeaderError, TensorInfo, read_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: Files copied into the adapter store (the first two are required). Nothing else is ever stored.
STORED_FILES = (CONFIG_FILE, WEIGHTS_FILE, "README.md")
#: Suffixes of files that can carry pickles or code; their mere presence refuses the folder.
UNSAFE_SUFFIXES = frozenset(
    {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".py", ".pyc", ".so"}
)
#: The values vLLM accepts for --max-lora-rank; an adapter's own r only has to be <= that value.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_CONFIG_BYTES = 1 << 20

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY_RE = re.compile(
    r"(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)"
)
_LAYER_RE = re.compile(r"model\.layers\.(?P<idx>\d+)\.(?P<block>self_attn|mlp)\.(?P<name>\w+)")
# Config fields that vLLM refuses or silently ignores (which would serve wrong outputs).
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save",
    "lora_bias": "LoRA bias",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
}


class AdapterRefusedError(ValueError):
    """The one base of adapter refusals, wherever they are decided. `code` is stable; `param` names the
    culprit. `gateway/errors.py` turns each code into its HTTP status, once.

        AdapterRefusedError
        ├── AdapterValidationError   the folder, its config, its tensors, or the name (this module)
        ├── SourceError              where the files come from (gateway/registry/sources.py)
        └── RegistryNotFoundError    no such adapter or version (gateway/registry/store.py)
    """

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class AdapterValidationError(AdapterRefusedError):
    """An adapter (its files or its name) is refused; the codes are in the module docstring."""


def _err(code: str, param: str | None, message: str) -> AdapterValidationError:
    return AdapterValidationError(message, code, param)


DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}


@dataclass(frozen=True)
class BaseModelSpec:
    """The dimensions of a Llama-like base model: which modules an adapter may target, and their shapes."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_hidden_layers: int
    path: str | None = None
    aliases: frozenset[str] = frozenset()
    weight_bytes: int = 2  # of one weight in the model's dtype (config.json's `dtype`/`torch_dtype`)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str, path: str | None = None) -> BaseModelSpec:
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            spec = cls(
                name=name,
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                path=path,
                aliases=frozenset(a for a in [config.get("_name_or_path")] if isinstance(a, str) and a),
                weight_bytes=DTYPE_BYTES.get(str(config.get("dtype") or config.get("torch_dtype")), 2),
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"base model config for {name!r} is not Llama-like: {exc!r}") from exc
        return spec

    @classmethod
    def from_model_dir(cls, path: str | os.PathLike[str], name: str) -> BaseModelSpec:
        """Read `<path>/config.json` of a Hugging Face model folder."""
        folder = Path(path)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return cls.from_config(config, name, str(folder.resolve()))

    @property
    def names(self) -> frozenset[str]:
        """Every string an adapter's base_model_name_or_path may use to name this base."""
        return frozenset({self.name, *self.aliases, *([self.path] if self.path else [])})

    @property
    def modules(self) -> dict[str, tuple[int, int]]:
        """Module short name -> (in_features, out_features). embed_tokens is (vocab, hidden)."""
        h = self.hidden_size
        linear = linear_shapes(
            {
                "hidden_size": h,
                "intermediate_size": self.intermediate_size,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
            }
        )
        return {**linear, "lm_head": (h, self.vocab_size), "embed_tokens": (self.vocab_size, h)}

    def lora_bytes(self, rank: int) -> int:
        """The weights of a rank-`rank` LoRA on all 7 linear layers of every decoder layer, in the model's
        dtype: the most an adapter the engine accepts at `--max-lora-rank` `rank` holds (embeddings and
        lm_head aside, which vLLM's LoRA does not take)."""
        per_layer = sum(i + o for name, (i, o) in self.modules.items() if name in LINEAR_MODULES)
        return rank * per_layer * self.num_hidden_layers * self.weight_bytes

    def module_paths(self) -> list[str]:
        """Full module names as PEFT matches them (`model.layers.0.self_attn.q_proj`, `lm_head`, ...)."""
        paths = ["model.embed_tokens"]
        for i in range(self.num_hidden_layers):
            paths += [f"model.layers.{i}.self_attn.{m}" for m in ATTENTION_MODULES]
            paths += [f"model.layers.{i}.mlp.{m}" for m in MLP_MODULES]
        return [*paths, "lm_head"]


@dataclass(frozen=True)
class AdapterInfo:
    """What validation learned about an accepted adapter."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # short names, sorted
    base_model_name_or_path: str | None
    total_bytes: int  # of the files that will be stored
    files: tuple[str, ...]  # the files that will be stored
    base_mismatch_forced: bool
    use_rslora: bool = False
    tensor_count: int = 0


def is_valid_adapter_name(name: str) -> bool:
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def validate_adapter_name(name: str, *, reserved: Collection[str] = ()) -> str:
    """Return `name` if it is a safe adapter name (`@` is reserved for `name@3` version pins)."""
    if not is_valid_adapter_name(name):
        raise _err(
            "invalid_name",
            "name",
            f"Invalid adapter name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit.",
        )
    if name in reserved:
        raise _err("invalid_name", "name", f"The name {name!r} is reserved.")
    return name


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for reading (following symlinks); refuse FIFOs, devices and folders."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _err("unsafe_file", "source", f"{os.fspath(path)} is not a regular file.")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def validate_adapter_dir(
    path: str | os.PathLike[str],
    base: BaseModelSpec,
    *,
    max_rank: int,
    max_bytes: int,
    allowed_base_names: Collection[str] | None = None,
    force_base: bool = False,
) -> AdapterInfo:
    """Validate the adapter in folder `path` against `base`; raise `AdapterValidationError` if refused."""
    folder = Path(path)
    if not folder.is_dir():
        raise _err("missing_file", "source", f"{folder} is not a folder.")
    try:
        _refuse_unsafe_files(folder)
        files, total = _stored_files(folder)
        if total > max_bytes:
            msg = f"The adapter's files take {total} bytes, more than the {max_bytes} allowed."
            raise _err("too_large", "source", msg)
        config = _read_config(folder / CONFIG_FILE)
        rank, alpha, targets, declared, forced = _check_config(
            config, base, max_rank, allowed_base_names, force_base
        )
        count = _check_tensors(read_safetensors_header(folder / WEIGHTS_FILE), base, rank, targets)
    except OSError as exc:  # permissions, I/O errors, symlink loops: the files cannot be read
        raise _err("missing_file", "source", f"The adapter's files cannot be read: {exc}") from None
    return AdapterInfo(
        rank=rank,
        alpha=alpha,
        target_modules=tuple(sorted(targets)),
        base_model_name_or_path=declared,
        total_bytes=total,
        files=tuple(files),
        base_mismatch_forced=forced,
        use_rslora=bool(config.get("use_rslora")),
        tensor_count=count,
    )


def _stored_files(folder: Path) -> tuple[list[str], int]:
    files, total = [], 0
    for name in STORED_FILES:
        try:
            st = (folder / name).stat()
        except FileNotFoundError:
            if name == WEIGHTS_FILE:
                msg = f"The adapter has no {name} (weights are only accepted as safetensors)."
                raise _err("missing_file", name, msg) from None
            if name == CONFIG_FILE:
                raise _err("missing_file", name, f"The adapter has no {name}.") from None
            continue
        if not stat.S_ISREG(st.st_mode):
            raise _err("unsafe_file", name, f"{name} is not a regular file.")
        files.append(name)
        total += st.st_size
    return files, total


def _refuse_unsafe_files(folder: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for entry in sorted([*filenames, *dirnames]):
            if os.path.splitext(entry)[1].lower() in UNSAFE_SUFFIXES:
                rel = os.path.relpath(os.path.join(dirpath, entry), folder)
                weights = (
                    " (weights must be in adapter_model.safetensors)"
                    if entry.startswith("adapter_model")
                    else ""
                )
                raise _err(
                    "unsafe_file", rel, f"Refusing {rel}: pickle or code files are not accepted{weights}."
                )


def _read_config(path: Path) -> dict[str, Any]:
    with open_regular(path) as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise _err("bad_config", CONFIG_FILE, f"{CONFIG_FILE} is larger than 1 MiB.")
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _err("bad_config", CONFIG_FILE, f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise _err("bad_config", CONFIG_FILE, f"{CONFIG_FILE} must hold a JSON object.")
    return config


def _check_config(
    config: dict[str, Any],
    base: BaseModelSpec,
    max_rank: int,
    allowed_base_names: Collection[str] | None,
    force_base: bool,
) -> tuple[int, float, set[str], str | None, bool]:
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise _err("bad_config", "peft_type", "adapter_config.json has no peft_type.")
    if peft_type != "LORA":
        raise _err("not_lora", "peft_type", f"peft_type is {peft_type!r}; only LORA is served.")
    for field, what in _UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise _err("unsupported", field, f"{what} is not supported by the engine.")
    if config.get("bias", "none") not in (None, "none"):
        raise _err("unsupported", "bias", "LoRA bias is not supported (bias must be 'none').")
    rank = config.get("r")
    if type(rank) is not int or rank < 1:
        raise _err("bad_config", "r", "r must be a positive integer.")
    if rank > max_rank:
        raise _err(
            "rank_too_large",
            "r",
            f"The adapter's rank {rank} is above the engine's max LoRA rank {max_rank}.",
        )
    alpha = config.get("lora_alpha")
    if type(alpha) not in (int, float) or not math.isfinite(alpha):
        raise _err("bad_config", "lora_alpha", "lora_alpha must be a number.")
    declared = config.get("base_model_name_or_path")
    if declared is not None and not isinstance(declared, str):
        raise _err("bad_config", "base_model_name_or_path", "base_model_name_or_path must be a string.")
    forced = False
    if not _base_matches(declared or "", base, allowed_base_names or ()):
        if not force_base:
            raise _err(
                "base_mismatch",
                "base_model_name_or_path",
                f"The adapter was trained on {declared!r}, but the served base is {base.name!r} "
                "(register with force to override).",
            )
        forced = True
    targets = _resolve_targets(config.get("target_modules"), base)
    return rank, float(alpha), targets, declared, forced


def _norm(name: str) -> str:
    return name.strip().rstrip("/").casefold()


def _base_matches(declared: str, base: BaseModelSpec, allowed: Collection[str]) -> bool:
    if not declared.strip():
        return False
    if _norm(declared) in {_norm(n) for n in (*base.names, *allowed)}:
        return True
    if base.path and os.path.isabs(declared) and os.path.exists(declared):
        return os.path.realpath(declared) == os.path.realpath(base.path)
    return False


def _resolve_targets(targets: Any, base: BaseModelSpec) -> set[str]:
    """PEFT matching: a string is a regex over full module names (or `all-linear`); a list, suffixes."""
    paths = base.module_paths()
    if targets == "all-linear":
        return set(LINEAR_MODULES)
    if isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as exc:
            raise _err("bad_config", "target_modules", f"target_modules regex: {exc}") from None
        found = {p.rsplit(".", 1)[-1] for p in paths if rx.fullmatch(p)}
        if not found:
            raise _err(
                "unknown_module",
                "target_modules",
                f"target_modules {targets!r} matches no module of the base.",
            )
        return found
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise _err(
            "bad_config", "target_modules", "target_modules must be a non-empty list of names or a string."
        )
    found = set()
    for target in sorted(set(targets)):
        matched = {p.rsplit(".", 1)[-1] for p in paths if p == target or p.endswith("." + target)}
        if not matched:
            raise _err(
                "unknown_module",
                "target_modules",
                f"Target module {target!r} does not exist in the base {base.name!r}.",
            )
        found |= matched
    return found


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """The tensors listed in a safetensors file's header (the data is neither read nor trusted)."""
    with open_regular(path) as f:
        try:
            return read_header(f)
        except SafetensorsHeaderError as exc:
            msg = f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}."
            raise _err("bad_safetensors", WEIGHTS_FILE, msg) from None


def _check_tensors(header: dict[str, TensorInfo], base: BaseModelSpec, rank: int, targets: set[str]) -> int:
    dims = base.modules
    halves: dict[str, set[str]] = {}
    for key in sorted(header):
        info = header[key]
        match = _KEY_RE.fullmatch(key)
        if match is None:
            what = "DoRA magnitude" if "lora_magnitude_vector" in key else "a non-LoRA tensor"
            raise _err(
                "unsupported",
                WEIGHTS_FILE,
                f"Tensor {key!r} is {what} (modules_to_save, biases and full weights are not supported).",
            )
        module, kind = match["module"], match["kind"]
        name = _module_name(module, key, base)
        if name not in targets:
            raise _err(
                "unknown_module",
                WEIGHTS_FILE,
                f"Tensor {key!r} is for {name!r}, which target_modules does not list.",
            )
        if kind.startswith("lora_embedding") and name != "embed_tokens":
            raise _err("unsupported", WEIGHTS_FILE, f"Tensor {key!r}: embedding LoRA on a linear module.")
        if info.dtype not in FLOAT_DTYPES:
            raise _err("unsupported", WEIGHTS_FILE, f"Tensor {key!r} has dtype {info.dtype}.")
        in_f, out_f = dims[name]
        half = "A" if kind in ("lora_A.weight", "lora_embedding_A") else "B"
        expected = (rank, in_f) if half == "A" else (out_f, rank)
        if info.shape != expected:
            raise _err(
                "shape_mismatch",
                WEIGHTS_FILE,
                f"Tensor {key!r} has shape {list(info.shape)}; the base {base.name!r} with r={rank} "
                f"needs {list(expected)}.",
            )
        halves.setdefault(module, set()).add(half)
    if not halves:
        raise _err("bad_safetensors", WEIGHTS_FILE, f"{WEIGHTS_FILE} holds no LoRA tensor.")
    for module, seen in sorted(halves.items()):
        if seen != {"A", "B"}:
            raise _err(
                "shape_mismatch",
                WEIGHTS_FILE,
                f"Module {module!r} has lora_{seen.pop()} but not its partner.",
            )
    return len(header)


def _module_name(module: str, key: str, base: BaseModelSpec) -> str:
    if module == "lm_head":
        return "lm_head"
    if module == "model.embed_tokens":
        return "embed_tokens"
    match = _LAYER_RE.fullmatch(module)
    if match is None or BLOCKS.get(match["name"]) != match["block"]:
        raise _err(
            "unknown_module",
            WEIGHTS_FILE,
            f"Tensor {key!r} names module {module!r}, which does not exist in the base {base.name!r}.",
        )
    if int(match["idx"]) >= base.num_hidden_layers:
        raise _err(
            "shape_mismatch",
            WEIGHTS_FILE,
            f"Tensor {key!r} is for layer {match['idx']}, but the base has {base.num_hidden_layers} layers.",
        )
    return match["name"]
