"""adapters/validate.py: every refusal rule gets a crafted bad adapter, written to real files."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adapters.validate import (
    AdapterValidationError,
    BaseModelSpec,
    read_safetensors_header,
    validate_adapter_dir,
    validate_adapter_name,
)

BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 512,
}
DIMS = {  # (in, out) for the config above
    "q_proj": (256, 256), "k_proj": (256, 256), "v_proj": (256, 256), "o_proj": (256, 256),
    "gate_proj": (256, 512), "up_proj": (256, 512), "down_proj": (512, 256),
    "lm_head": (256, 512), "embed_tokens": (512, 256),
}  # fmt: skip
BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
LIMITS = {"max_rank": 16, "max_bytes": 10_000_000}


@pytest.fixture
def base(tmp_path: Path) -> BaseModelSpec:
    folder = tmp_path / "models" / "tiny-llama"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(BASE_CONFIG))
    return BaseModelSpec.from_model_dir(folder, "tiny-llama")


def lora_tensors(r: int = 8, modules: tuple[str, ...] = ("q_proj", "v_proj"), layers: int = 2) -> dict:
    tensors = {}
    for i in range(layers):
        for m in modules:
            prefix = f"base_model.model.model.layers.{i}.{BLOCK.get(m, 'mlp')}.{m}"
            in_f, out_f = DIMS[m]
            tensors[f"{prefix}.lora_A.weight"] = np.zeros((r, in_f), np.float16)
            tensors[f"{prefix}.lora_B.weight"] = np.zeros((out_f, r), np.float16)
    return tensors


def write_adapter(
    folder: Path, *, r: int = 8, targets: object = ("q_proj", "v_proj"), tensors: dict | None = None, **config
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 16,
        "target_modules": list(targets) if isinstance(targets, tuple) else targets,
        "base_model_name_or_path": "tiny-llama",
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    cfg.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(lora_tensors(r) if tensors is None else tensors, str(folder / "adapter_model.safetensors"))
    return folder


def refused(path: Path, base: BaseModelSpec, code: str, **kwargs: object) -> AdapterValidationError:
    with pytest.raises(AdapterValidationError) as info:
        validate_adapter_dir(path, base, **{**LIMITS, **kwargs})  # type: ignore[arg-type]
    assert info.value.code == code, info.value.message
    return info.value


def raw_safetensors(path: Path, header: bytes | dict, data: bytes = b"") -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


# -- the base ---------------------------------------------------------------------------------


def test_base_spec_from_config_json(base: BaseModelSpec, tmp_path: Path) -> None:
    assert base.modules == DIMS
    assert base.names == {"tiny-llama", str((tmp_path / "models" / "tiny-llama").resolve())}
    assert len(base.module_paths()) == 2 * 7 + 2
    gqa = BaseModelSpec.from_config({**BASE_CONFIG, "num_key_value_heads": 2, "head_dim": None}, "gqa")
    assert gqa.head_dim == 64 and gqa.modules["k_proj"] == (256, 128) and gqa.modules["o_proj"] == (256, 256)
    with pytest.raises(ValueError, match="not Llama-like"):
        BaseModelSpec.from_config({"hidden_size": 256}, "broken")


# -- accepted ---------------------------------------------------------------------------------


def test_valid_adapter_is_accepted(base: BaseModelSpec, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "ok")
    (folder / "README.md").write_text("# ok\n")
    (folder / "notes.txt").write_text("ignored, never stored")
    info = validate_adapter_dir(folder, base, **LIMITS)
    assert (info.rank, info.alpha, info.target_modules) == (8, 16.0, ("q_proj", "v_proj"))
    assert info.files == ("adapter_config.json", "adapter_model.safetensors", "README.md")
    assert info.total_bytes == sum((folder / f).stat().st_size for f in info.files)
    assert info.base_model_name_or_path == "tiny-llama" and not info.base_mismatch_forced
    assert info.tensor_count == 8


@pytest.mark.parametrize(
    "targets",
    [
        "all-linear",
        r".*\.(q_proj|v_proj)",
        ["self_attn.q_proj", "v_proj"],
        # what PEFT writes after expanding "all-linear": full module paths
        [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")],
    ],
)
def test_target_module_forms_peft_accepts(base: BaseModelSpec, tmp_path: Path, targets: object) -> None:
    assert validate_adapter_dir(write_adapter(tmp_path / "a", targets=targets), base, **LIMITS).rank == 8


def test_rank_below_max_need_not_be_a_vllm_max_rank_value(base: BaseModelSpec, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "r4", r=4)
    assert validate_adapter_dir(folder, base, **LIMITS).rank == 4


def test_embedding_and_lm_head_lora(base: BaseModelSpec, tmp_path: Path) -> None:
    tensors = {
        "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((8, 512), np.float32),
        "base_model.model.model.embed_tokens.lora_embedding_B": np.zeros((256, 8), np.float32),
        "base_model.model.lm_head.lora_A.weight": np.zeros((8, 256), np.float32),
        "base_model.model.lm_head.lora_B.weight": np.zeros((512, 8), np.float32),
    }
    folder = write_adapter(tmp_path / "emb", targets=("embed_tokens", "lm_head"), tensors=tensors)
    assert validate_adapter_dir(folder, base, **LIMITS).target_modules == ("embed_tokens", "lm_head")


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sql", "SQL-v2", "a", "x" * 64, "team_a.sql-2", "9lives"])
def test_valid_names(name: str) -> None:
    assert validate_adapter_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "-sql", ".hidden", "sql@3", "a/b", "../x", "a b", "x" * 65, "sql\n", "café", "_x"]
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(AdapterValidationError) as info:
        validate_adapter_name(name)
    assert (info.value.code, info.value.param) == ("invalid_name", "name")


def test_reserved_name() -> None:
    with pytest.raises(AdapterValidationError, match="reserved"):
        validate_adapter_name("tiny-llama", reserved={"tiny-llama"})


# -- unsafe and missing files -----------------------------------------------------------------


class _WritesFile:
    """Unpickling this calls open(path, "w"): it creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def test_pickle_bin_is_refused_and_never_unpickled(base: BaseModelSpec, tmp_path: Path) -> None:
    canary = tmp_path / "canary"  # proves the payload works when unpickled
    pickle.loads(pickle.dumps(_WritesFile(canary))).close()
    assert canary.exists()

    marker = tmp_path / "pwned"
    folder = write_adapter(tmp_path / "evil")
    os.unlink(folder / "adapter_model.safetensors")
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_WritesFile(marker)))
    err = refused(folder, base, "unsafe_file")
    assert err.param == "adapter_model.bin" and "safetensors" in err.message
    assert not marker.exists()


@pytest.mark.parametrize(
    "name", ["training_args.bin", "modeling_custom.py", "sub/optimizer.pt", "x.PKL", "w.ckpt"]
)
def test_any_unsafe_file_refuses_the_folder(base: BaseModelSpec, tmp_path: Path, name: str) -> None:
    folder = write_adapter(tmp_path / "a")
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"\x80\x04N.")
    assert refused(folder, base, "unsafe_file").param == name


def test_missing_files(base: BaseModelSpec, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "a")
    os.unlink(folder / "adapter_model.safetensors")
    assert refused(folder, base, "missing_file").param == "adapter_model.safetensors"
    os.unlink(folder / "adapter_config.json")
    assert refused(folder, base, "missing_file").param == "adapter_config.json"
    refused(tmp_path / "nowhere", base, "missing_file")


def test_non_regular_files_are_refused_without_blocking(base: BaseModelSpec, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "a")
    os.unlink(folder / "adapter_config.json")
    os.mkfifo(folder / "adapter_config.json")  # reading it would block forever
    refused(folder, base, "unsafe_file")
    os.unlink(folder / "adapter_config.json")
    (folder / "adapter_config.json").mkdir()
    refused(folder, base, "unsafe_file")


def test_unreadable_file_is_a_clear_refusal(base: BaseModelSpec, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "a")
    os.unlink(folder / "adapter_config.json")
    (folder / "adapter_config.json").symlink_to("adapter_config.json")  # a loop: stat() fails with ELOOP
    assert "cannot be read" in refused(folder, base, "missing_file").message


def test_too_large(base: BaseModelSpec, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "a")
    refused(folder, base, "too_large", max_bytes=1000)


# -- the config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "param"),
    [
        ("{not json", "adapter_config.json"),
        ("[1, 2]", "adapter_config.json"),
        (json.dumps({"r": 8}), "peft_type"),
    ],
)
def test_malformed_config(base: BaseModelSpec, tmp_path: Path, text: str, param: str) -> None:
    folder = write_adapter(tmp_path / "a")
    (folder / "adapter_config.json").write_text(text)
    assert refused(folder, base, "bad_config").param == param


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("r", "8"),
        ("r", 0),
        ("r", True),
        ("r", None),
        ("lora_alpha", None),
        ("lora_alpha", "16"),
        ("target_modules", None),
        ("target_modules", []),
        ("target_modules", [1]),
        ("target_modules", "(unclosed"),
        ("base_model_name_or_path", 5),
    ],
)
def test_bad_config_fields(base: BaseModelSpec, tmp_path: Path, field: str, value: object) -> None:
    folder = write_adapter(tmp_path / "a", tensors=lora_tensors(), **{field: value})
    assert refused(folder, base, "bad_config").param == field


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "lora", "PREFIX_TUNING"])
def test_not_lora(base: BaseModelSpec, tmp_path: Path, peft_type: str) -> None:
    refused(write_adapter(tmp_path / "a", peft_type=peft_type), base, "not_lora")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_dora", True),
        ("modules_to_save", ["lm_head"]),
        ("bias", "all"),
        ("bias", "lora_only"),
        ("lora_bias", True),
        ("rank_pattern", {"q_proj": 4}),
        ("alpha_pattern", {"q_proj": 32}),
        ("layer_replication", [[0, 1]]),
    ],
)
def test_unsupported_features(base: BaseModelSpec, tmp_path: Path, field: str, value: object) -> None:
    assert refused(write_adapter(tmp_path / "a", **{field: value}), base, "unsupported").param == field


def test_rank_too_large(base: BaseModelSpec, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "a", r=32)
    err = refused(folder, base, "rank_too_large", max_rank=16)
    assert err.param == "r" and "32" in err.message and "16" in err.message
    assert validate_adapter_dir(folder, base, max_rank=32, max_bytes=10**7).rank == 32


# -- the base it was trained on ---------------------------------------------------------------


@pytest.mark.parametrize("declared", ["meta-llama/Llama-3.1-8B-Instruct", None, "", "/elsewhere/tiny-llama"])
def test_wrong_base_is_refused_unless_forced(base: BaseModelSpec, tmp_path: Path, declared: object) -> None:
    folder = write_adapter(tmp_path / "a", base_model_name_or_path=declared)
    assert refused(folder, base, "base_mismatch").param == "base_model_name_or_path"
    info = validate_adapter_dir(folder, base, **LIMITS, force_base=True)
    assert info.base_mismatch_forced and info.base_model_name_or_path == declared


def test_base_matches_by_name_path_alias_or_allowed(base: BaseModelSpec, tmp_path: Path) -> None:
    assert base.path is not None
    for declared in ["tiny-llama", "TINY-LLAMA", base.path, base.path + "/", "org/tiny-llama-hf"]:
        folder = write_adapter(tmp_path / "a", base_model_name_or_path=declared)
        info = validate_adapter_dir(folder, base, **LIMITS, allowed_base_names={"org/tiny-llama-hf"})
        assert not info.base_mismatch_forced
    link = tmp_path / "link-to-base"
    link.symlink_to(base.path)
    folder = write_adapter(tmp_path / "a", base_model_name_or_path=str(link))
    assert not validate_adapter_dir(folder, base, **LIMITS).base_mismatch_forced
    hub = BaseModelSpec.from_config({**BASE_CONFIG, "_name_or_path": "acme/tiny-llama"}, "tiny")
    folder = write_adapter(tmp_path / "a", base_model_name_or_path="acme/tiny-llama")
    assert not validate_adapter_dir(folder, hub, **LIMITS).base_mismatch_forced


def test_force_does_not_bypass_shape_checks(base: BaseModelSpec, tmp_path: Path) -> None:
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = np.zeros(
        (8, 4096), np.float16
    )
    folder = write_adapter(tmp_path / "a", tensors=tensors, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    refused(folder, base, "shape_mismatch", force_base=True)


# -- modules and shapes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "targets", [("q_proj", "c_attn"), ("query_key_value",), r".*\.c_attn", ["mlp.q_proj"]]
)
def test_target_module_missing_from_base(base: BaseModelSpec, tmp_path: Path, targets: object) -> None:
    assert (
        refused(write_adapter(tmp_path / "a", targets=targets), base, "unknown_module").param
        == "target_modules"
    )


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.model.layers.0.self_attn.c_attn.lora_A.weight",  # no such module
        "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",  # q_proj lives in self_attn
        "base_model.model.transformer.h.0.attn.q_proj.lora_A.weight",  # another architecture's names
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",  # in the base, not targeted
    ],
)
def test_tensor_for_a_module_the_adapter_cannot_have(base: BaseModelSpec, tmp_path: Path, key: str) -> None:
    tensors = lora_tensors()
    tensors[key] = np.zeros((8, 256), np.float16)
    tensors[key.replace("lora_A", "lora_B")] = np.zeros((256, 8), np.float16)
    assert refused(write_adapter(tmp_path / "a", tensors=tensors), base, "unknown_module").param == (
        "adapter_model.safetensors"
    )


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", (8, 128)),  # wrong in_features
        ("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight", (512, 8)),  # wrong out_features
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", (256, 4)),  # rank != r
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", (8, 256, 1)),  # not 2-D
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", (256, 8)),  # transposed
    ],
)
def test_wrong_shapes(base: BaseModelSpec, tmp_path: Path, key: str, shape: tuple[int, ...]) -> None:
    tensors = lora_tensors()
    tensors[key] = np.zeros(shape, np.float16)
    err = refused(write_adapter(tmp_path / "a", tensors=tensors), base, "shape_mismatch")
    assert key in err.message


def test_layer_index_beyond_the_base(base: BaseModelSpec, tmp_path: Path) -> None:
    tensors = lora_tensors(layers=3)  # the base has 2 layers
    err = refused(write_adapter(tmp_path / "a", tensors=tensors), base, "shape_mismatch")
    assert "layer 2" in err.message


def test_lora_a_without_lora_b(base: BaseModelSpec, tmp_path: Path) -> None:
    tensors = lora_tensors()
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    refused(write_adapter(tmp_path / "a", tensors=tensors), base, "shape_mismatch")


@pytest.mark.parametrize(
    ("key", "array"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", np.zeros(256, np.float16)),
        (
            "base_model.model.lm_head.base_layer.weight",
            np.zeros((512, 256), np.float16),
        ),  # PEFT's saved embedding
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", np.zeros(256, np.float16)),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", np.zeros((8, 256), np.int8)),
    ],
)
def test_unsupported_tensors(base: BaseModelSpec, tmp_path: Path, key: str, array: np.ndarray) -> None:
    tensors = lora_tensors()
    tensors[key] = array
    refused(write_adapter(tmp_path / "a", tensors=tensors), base, "unsupported")


# -- the safetensors header -------------------------------------------------------------------


def test_header_reader_agrees_with_safetensors(tmp_path: Path) -> None:
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((4,), np.float16)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    header = read_safetensors_header(tmp_path / "x.safetensors")
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert {k: (v.dtype, v.shape) for k, v in header.items()} == {"a": ("F32", (2, 3)), "b": ("F16", (4,))}
    assert {k: v.shape for k, v in loaded.items()} == {"a": (2, 3), "b": (4,)}


T = {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data"),
    [
        (b"", b""),  # nothing after the length
        (b"not json", b""),
        (b'["a list"]', b""),
        (b'{"t": ' + json.dumps(T).encode() + b', "t": ' + json.dumps(T).encode() + b"}", b"\0" * 8),
        ({"t": {**T, "dtype": "Q4"}}, b"\0" * 8),
        ({"t": {**T, "shape": [2, 3]}}, b"\0" * 8),  # 12 bytes of F16 declared in 8
        ({"t": {**T, "data_offsets": [4, 12]}}, b"\0" * 12),  # hole at the start
        ({"t": T, "u": {**T, "data_offsets": [4, 12]}}, b"\0" * 12),  # overlap
        ({"t": T}, b"\0" * 9),  # trailing bytes
        ({"t": {**T, "shape": [-2, 2]}}, b"\0" * 8),
        ({"__metadata__": {"format": 1}, "t": T}, b"\0" * 8),
        ({}, b""),  # valid file, but no LoRA tensor
    ],
)
def test_bad_safetensors(base: BaseModelSpec, tmp_path: Path, header: bytes | dict, data: bytes) -> None:
    folder = write_adapter(tmp_path / "a")
    raw_safetensors(folder / "adapter_model.safetensors", header, data)
    assert refused(folder, base, "bad_safetensors").param == "adapter_model.safetensors"


@pytest.mark.parametrize("content", [b"", b"\x01\x02", struct.pack("<Q", 1 << 40) + b"{}"])
def test_truncated_or_lying_length(base: BaseModelSpec, tmp_path: Path, content: bytes) -> None:
    folder = write_adapter(tmp_path / "a")
    (folder / "adapter_model.safetensors").write_bytes(content)
    refused(folder, base, "bad_safetensors")
