"""Every validation rule, through `POST /admin/adapters` of a real gateway: a clear 4xx in OpenAI's
shape naming the problem (`code`) and the culprit (`param`), and nothing reaches vLLM or the store.

One crafted bad adapter per rule, each built from a good one under the allowed root `src/`; `outside/`
is a folder the gateway may not read from.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.conftest import GatewayProcess, serve_app
from tests.registry_helpers import (
    register,
    registry_settings,
    rewrite_config,
    text,
    vllm_adapters,
    write_adapter,
)
from tests.test_errors_e2e import assert_openai_error

pytestmark = pytest.mark.engine

WEIGHTS = "adapter_model.safetensors"


class Env:
    def __init__(self, url: str, vllm_url: str, data: Path, base: Path, root: Path, outside: Path) -> None:
        self.url, self.vllm_url, self.data, self.base = url, vllm_url, data, base
        self.root, self.good, self.outside = root, root / "good", outside

    def copy_good(self, name: str) -> Path:
        return Path(shutil.copytree(self.good, self.root / name))


@pytest.fixture(scope="module")
def env(
    gateway_proc: GatewayProcess, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path_factory
) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("validation")
    root = tmp / "src"
    good = write_adapter(tiny_cache["base"], root / "good", seed=7)
    outside = write_adapter(tiny_cache["base"], tmp / "outside" / "evil", seed=8)
    size = sum(p.stat().st_size for p in good.iterdir())
    settings = registry_settings(
        gateway_proc.vllm_url, cache_dir, tmp, root, registry={"max_adapter_bytes": int(size * 1.5)}
    )
    with serve_app(settings) as url:
        yield Env(url, gateway_proc.vllm_url, tmp / "data", tiny_cache["base"], root, outside)


# -- the crafted adapters: each returns the `source` to register --------------------------------


def pickle_bin(env: Env, marker: Path) -> str:
    """Old-style PEFT weights as a pickle whose loading would create `marker`."""

    class Payload:
        def __reduce__(self) -> tuple:
            return (open, (str(marker), "w"))

    folder = env.copy_good("pickle")
    (folder / WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    return str(folder)


def python_file(env: Env, marker: Path) -> str:
    folder = env.copy_good("code")
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w')\n")
    return str(folder)


def rank_too_large(env: Env, marker: Path) -> str:
    folder = write_adapter(env.base, env.root / "rank32", seed=9, rank=32, target_modules=("q_proj",))
    return str(folder)  # vLLM runs with --max-lora-rank 16


def wrong_base(env: Env, marker: Path) -> str:
    folder = env.copy_good("other-base")
    rewrite_config(folder, base_model_name_or_path="meta-llama/Llama-3.1-8B-Instruct")
    return str(folder)


def missing_module(env: Env, marker: Path) -> str:
    folder = env.copy_good("missing-module")
    rewrite_config(folder, target_modules=["q_proj", "c_attn"])
    return str(folder)


def wrong_shapes(env: Env, marker: Path) -> str:
    folder = env.copy_good("shapes")
    tensors = load_file(str(folder / WEIGHTS))
    key = next(k for k in sorted(tensors) if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = np.zeros((8, 128), np.float32)  # the tiny base's hidden size is 256
    save_file(tensors, str(folder / WEIGHTS))
    return str(folder)


def not_lora(env: Env, marker: Path) -> str:
    folder = env.copy_good("ia3")
    rewrite_config(folder, peft_type="IA3")
    return str(folder)


def too_large(env: Env, marker: Path) -> str:
    folder = env.copy_good("large")
    (folder / "README.md").write_bytes(b"x" * (folder / WEIGHTS).stat().st_size)
    return str(folder)


def dotdot(env: Env, marker: Path) -> str:
    return f"{env.root}/../outside/evil"


def symlinked_folder(env: Env, marker: Path) -> str:
    (env.root / "sneaky").symlink_to(env.outside)
    return str(env.root / "sneaky")


def symlinked_file(env: Env, marker: Path) -> str:
    folder = env.copy_good("sneaky-file")
    (folder / WEIGHTS).unlink()
    (folder / WEIGHTS).symlink_to(env.outside / WEIGHTS)
    return str(folder)


def absolute_outside(env: Env, marker: Path) -> str:
    return str(env.outside)


def missing_folder(env: Env, marker: Path) -> str:
    return str(env.root / "nothing-here")


CASES: list[tuple[Callable[[Env, Path], str], int, str, str]] = [
    (pickle_bin, 400, "unsafe_file", "adapter_model.bin"),
    (python_file, 400, "unsafe_file", "modeling_custom.py"),
    (rank_too_large, 400, "rank_too_large", "r"),
    (wrong_base, 400, "base_mismatch", "base_model_name_or_path"),
    (missing_module, 400, "unknown_module", "target_modules"),
    (wrong_shapes, 400, "shape_mismatch", WEIGHTS),
    (not_lora, 400, "not_lora", "peft_type"),
    (too_large, 413, "too_large", "source"),
    (dotdot, 403, "source_not_allowed", "source"),
    (symlinked_folder, 403, "source_not_allowed", "source"),
    (symlinked_file, 403, "source_not_allowed", WEIGHTS),
    (absolute_outside, 403, "source_not_allowed", "source"),
    (missing_folder, 404, "source_not_found", "source"),
]


def committed_digests(env: Env) -> set[str]:
    adapters = httpx.get(env.url + "/admin/adapters").json()["data"]
    return {v["digest"] for a in adapters for v in a["versions"] if v["status"] == "ready"}


def assert_nothing_reached_vllm_or_the_store(env: Env, before: set[str], session_url: str) -> None:
    # vLLM may gain only what the session's own gateway restores meanwhile (it shares this vLLM).
    session = httpx.get(session_url + "/admin/adapters").json()["data"]
    theirs = {v["engine_name"] for a in session for v in a["versions"]}
    assert vllm_adapters(env.vllm_url) - before <= theirs
    assert {p.name for p in (env.data / "adapters").iterdir()} <= committed_digests(env)


@pytest.mark.parametrize(("make", "status", "code", "param"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_adapter_is_refused_before_vllm(
    env: Env,
    gateway_proc: GatewayProcess,
    tmp_path: Path,
    make: Callable[[Env, Path], str],
    status: int,
    code: str,
    param: str,
) -> None:
    marker = tmp_path / "pwned"
    source = make(env, marker)
    before = vllm_adapters(env.vllm_url)
    r = httpx.post(env.url + "/admin/adapters", json={"name": f"bad-{make.__name__}", "source": source})
    error = assert_openai_error(r, status, code, param)
    assert len(error["message"]) > 10
    assert not marker.exists(), "nothing from the adapter was ever executed or unpickled"
    assert_openai_error(httpx.get(f"{env.url}/admin/adapters/bad-{make.__name__}"), 404, "adapter_not_found")
    assert_nothing_reached_vllm_or_the_store(env, before, gateway_proc.url)


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"name": "bad/name", "source": "good"}, "invalid_name", "name"),
        ({"name": "has space", "source": "good"}, "invalid_name", "name"),
        ({"name": "sql@2", "source": "good"}, "invalid_name", "name"),
        ({"name": ".hidden", "source": "good"}, "invalid_name", "name"),
        ({"name": "tiny-llama", "source": "good"}, "invalid_name", "name"),  # the base model's name
        ({"name": "x" * 65, "source": "good"}, "invalid_value", "name"),
        ({"name": "ok"}, "invalid_value", "source"),
        ({"name": "ok", "source": "good", "revision": "main"}, "invalid_source", "revision"),
        ({"name": "ok", "source": "good", "unknown": 1}, "invalid_value", "unknown"),
    ],
)
def test_bad_request_is_400_naming_the_field(env: Env, body: dict, code: str, param: str) -> None:
    assert_openai_error(httpx.post(env.url + "/admin/adapters", json=body), 400, code, param)


def test_wrong_base_is_accepted_with_force_and_recorded(env: Env) -> None:
    folder = env.copy_good("forced")
    rewrite_config(folder, base_model_name_or_path="meta-llama/Llama-3.1-8B-Instruct")
    body = {"name": "forced", "source": str(folder)}
    assert_openai_error(httpx.post(env.url + "/admin/adapters", json=body), 400, "base_mismatch")
    version = register(env.url, "forced", folder, force=True)["registered"]
    assert version["forced_base"] is True
    shown = httpx.get(env.url + "/admin/adapters/forced").json()
    assert [v["forced_base"] for v in shown["versions"]] == [True]
    assert text(env.url, "forced")  # same shapes as the tiny base, so vLLM serves it
