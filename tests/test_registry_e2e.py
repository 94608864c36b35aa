"""The registry end to end: register from a folder and from an offline Hugging Face cache, versions,
aliases, pins, removal, `/v1/models`, and a gateway restart that finds everything still there.

Real vLLM (the session's), real SQLite file, real HTTP, the official OpenAI SDK.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import serve_app
from tests.registry_helpers import (
    BASE,
    PROMPT,
    engine,
    register,
    registry_settings,
    settled_view,
    text,
    write_adapter,
)
from tests.test_errors_e2e import assert_openai_error
from tests.test_sources import put_snapshot

pytestmark = pytest.mark.engine


def sdk_text(url: str, model: str) -> str:
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.model == model
    return r.choices[0].text


def admin_adapter(url: str, name: str) -> dict:
    r = httpx.get(f"{url}/admin/adapters/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def model_ids(url: str) -> dict[str, str | None]:
    return {m["id"]: m["parent"] for m in httpx.get(url + "/v1/models").json()["data"]}


def test_versions_aliases_pins_removal_and_restart(
    vllm_url: str, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "src"
    v1 = write_adapter(tiny_cache["base"], root / "sql-v1", seed=101)
    v2 = write_adapter(tiny_cache["base"], root / "sql-v2", seed=202)
    settings = registry_settings(vllm_url, cache_dir, tmp_path, root)

    with serve_app(settings) as url:
        first = register(url, "sql", v1, description="first")["registered"]
        assert (first["model"], first["version"], first["source"]) == ("sql@1", 1, str(v1))
        assert first["rank"] == 8 and first["forced_base"] is False and first["revision"] is None
        assert (tmp_path / "data" / "adapters" / first["digest"] / "adapter_model.safetensors").is_file()
        out1 = sdk_text(url, "sql")
        assert out1 != text(url, BASE), "the adapter must change the base's output"

        # The source may change afterwards: what is served is the stored copy.
        write_adapter(tiny_cache["base"], v1, seed=999)
        assert sdk_text(url, "sql@1") == out1

        second = register(url, "sql", v2)["registered"]
        assert second["model"] == "sql@2" and second["digest"] != first["digest"]
        out2 = sdk_text(url, "sql")
        assert out2 != out1
        assert sdk_text(url, "sql@1") == out1 and sdk_text(url, "sql@2") == out2

        models = model_ids(url)
        assert {"sql": BASE, "sql@1": BASE, "sql@2": BASE}.items() <= models.items()
        assert models[BASE] is None

        r = httpx.put(url + "/admin/adapters/sql/alias", json={"version": 1})
        assert r.status_code == 200 and r.json()["alias_version"] == 1 and r.json()["current_version"] == 1
        assert sdk_text(url, "sql") == out1

        assert httpx.post(url + "/admin/adapters/sql/pin").json()["pinned"] is True
        assert "sql@1" in engine(url)["resident_models"]
        settled_view(url, vllm_url)  # resident is what vLLM has

    with serve_app(settings) as url:  # a new gateway process state on the same data_dir
        sql = admin_adapter(url, "sql")
        assert sql["pinned"] is True and sql["alias_version"] == 1 and sql["current_version"] == 1
        assert [(v["version"], v["status"], v["description"]) for v in sql["versions"]] == [
            (1, "ready", "first"),
            (2, "ready", ""),
        ]
        assert {"sql", "sql@1", "sql@2"} <= model_ids(url).keys()
        assert sdk_text(url, "sql") == out1 and sdk_text(url, "sql@2") == out2
        wait_for(lambda: "sql@1" in engine(url)["resident_models"], "pinned adapters are loaded at start")

        assert httpx.post(url + "/admin/adapters/sql/unpin").json()["pinned"] is False
        r = httpx.delete(url + "/admin/adapters/sql/alias")
        assert r.json()["alias_version"] is None and r.json()["current_version"] == 2
        assert sdk_text(url, "sql") == out2

        r = httpx.delete(url + "/admin/adapters/sql", params={"version": 2})
        assert [v["model"] for v in r.json()["removed"]] == ["sql@2"]
        assert sdk_text(url, "sql") == out1
        assert_openai_error(httpx.post(url + "/v1/completions", json={"model": "sql@2", "prompt": "x"}), 404)
        assert "sql@2" not in model_ids(url)

        r = httpx.delete(url + "/admin/adapters/sql")
        assert [v["model"] for v in r.json()["removed"]] == ["sql@1"]
        assert_openai_error(httpx.get(url + "/admin/adapters/sql"), 404, "adapter_not_found", "name")
        assert not {"sql", "sql@1"} & model_ids(url).keys()
        r = httpx.post(url + "/v1/completions", json={"model": "sql", "prompt": "x"})
        assert_openai_error(r, 404, "model_not_found", "model")

        third = register(url, "sql", v2)["registered"]
        assert third["model"] == "sql@3", "version numbers are never reused"

    with serve_app(settings) as url:
        sql = admin_adapter(url, "sql")
        assert [(v["version"], v["status"]) for v in sql["versions"]] == [
            (1, "retired"),
            (2, "retired"),
            (3, "ready"),
        ]
        assert sdk_text(url, "sql") == out2 and sdk_text(url, "sql@3") == out2
        assert [m["name"] for m in httpx.get(url + "/admin/adapters").json()["data"]] == ["sql"]


OLD_SHA = "a" * 40
NEW_SHA = "b" * 40


def test_register_from_offline_hugging_face_cache(
    vllm_url: str,
    cache_dir: Path,
    tiny_cache: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cache laid out as huggingface_hub lays it out; branch and tag resolve to the recorded sha."""
    root = tmp_path / "src"
    old = write_adapter(tiny_cache["base"], root / "old", seed=303)
    new = write_adapter(tiny_cache["base"], root / "new", seed=404)
    hub = tmp_path / "hf" / "hub"
    for folder, sha, refs in [(old, OLD_SHA, ("v1",)), (new, NEW_SHA, ("main",))]:
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        put_snapshot(hub, "acme/sql-lora", sha, files, refs=refs)
    shutil.rmtree(root / "new")  # the hub copy is the only one of these bytes
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))

    settings = registry_settings(vllm_url, cache_dir, tmp_path, root)
    with serve_app(settings) as url:
        main = register(url, "hub", "hf://acme/sql-lora", revision="main")["registered"]
        assert (main["source"], main["revision"]) == ("hf://acme/sql-lora", NEW_SHA)
        tag = register(url, "hub", "hf://acme/sql-lora@v1")["registered"]
        assert (tag["model"], tag["revision"]) == ("hub@2", OLD_SHA)
        local = register(url, "local-old", old)["registered"]
        assert local["digest"] == tag["digest"], "same bytes, same content address"

        out_new, out_old = sdk_text(url, "hub@1"), sdk_text(url, "hub")
        assert out_new != out_old and sdk_text(url, "local-old") == out_old

        r = httpx.post(url + "/admin/adapters", json={"name": "hub", "source": "hf://acme/sql-lora@nope"})
        assert_openai_error(r, 404, "revision_not_found", "revision")
        r = httpx.post(url + "/admin/adapters", json={"name": "hub", "source": "hf://acme/elsewhere"})
        assert_openai_error(r, 404, "source_not_found", "source")

    with serve_app(settings) as url:
        hub_versions = admin_adapter(url, "hub")["versions"]
        assert [(v["version"], v["revision"]) for v in hub_versions] == [(1, NEW_SHA), (2, OLD_SHA)]
        assert sdk_text(url, "hub@1") == out_new


def test_a_bad_folder_in_adapters_dir_is_skipped_and_the_others_serve(
    vllm_url: str, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "adapters"
    write_adapter(tiny_cache["base"], root / "good", seed=3100)
    write_adapter(tiny_cache["base"], root / "other-base", seed=3101, base_name="someone/else-7b")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    registry = {"seed_adapters_dir": True}
    settings = registry_settings(vllm_url, cache_dir, tmp_path, root, registry=registry, adapters_dir=root)
    with serve_app(settings) as url:  # starts: two refused folders do not stop the third from serving
        listed = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert "good" in listed and not {"other-base", "broken"} & listed
        assert text(url, "good")
