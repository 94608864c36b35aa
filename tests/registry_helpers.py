"""Shared by the registry's end-to-end tests: adapters on disk, a gateway that may register them, calls.

Each test runs its own in-process gateway (`serve_app`) attached to the session's vLLM, with its own
data_dir (its own SQLite file and adapter store) and `tmp_path/"src"` as the one allowed root. The
demo adapters are not seeded, so a test sees only what it registers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from adapters.demo import RandomAdapterSpec, write_random_adapter
from adapters.llama import LINEAR_MODULES
from gateway.settings import Settings
from loadtest.harness.verify import References, learn_all
from tests.conftest import ENGINE_AUTH, attached_settings

# One client for every look at a gateway or vLLM: `httpx.get` builds a client, and with it an SSL context
# (~20 ms of CPU holding the GIL, which an in-process gateway shares), on every call. While vLLM
# generates on both cores, such a look took as long as the whole generation (seen in CI), so a poll
# for a short-lived state saw it never.
HTTP = httpx.Client(timeout=30)

BASE = "tiny-llama"
PROMPT = "show users older than 30"


def write_adapter(
    base_dir: Path,
    folder: Path,
    seed: int,
    *,
    rank: int = 8,
    target_modules: tuple[str, ...] = LINEAR_MODULES,
    scale: float = 0.08,
    base_name: str = BASE,
) -> Path:
    """A valid PEFT LoRA adapter for the base in `base_dir`, random weights from `seed` (numpy only:
    `adapters/demo.py`'s random adapters, alpha 2 x rank).

    Different seeds give different greedy outputs, which is how the tests tell adapters apart.
    """
    spec = RandomAdapterSpec(
        folder.name, seed, rank=rank, alpha=2 * rank, scale=scale, target_modules=tuple(target_modules)
    )
    return write_random_adapter(base_dir, folder, spec, base_name)


def registry_settings(
    vllm_url: str, cache_dir: Path, tmp_path: Path, root: Path, **overrides: Any
) -> Settings:
    registry = {"allowed_roots": [root], "seed_adapters_dir": False, **overrides.pop("registry", {})}
    return attached_settings(vllm_url, cache_dir, tmp_path, registry=registry, **overrides)


def auth(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def register(url: str, name: str, source: Path | str, *, token: str | None = None, **body: Any) -> dict:
    r = httpx.post(
        url + "/admin/adapters",
        json={"name": name, "source": str(source), **body},
        headers=auth(token),
        timeout=60,
    )
    assert r.status_code == 201, r.text
    return r.json()


def complete(url: str, model: str, *, max_tokens: int = 6, key: str | None = None) -> httpx.Response:
    # greedy, and never cut short by EOS: each adapter's answer is its own (vLLM's `ignore_eos`)
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, headers=auth(key), timeout=120)


def text(url: str, model: str, **kw: Any) -> str:
    r = complete(url, model, **kw)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["choices"][0]["text"]


def learn(url: str, path: str, plan: Sequence[tuple[str, dict[str, Any]]], refs: References) -> None:
    """Each (model, body) of `plan` sent alone to `url + path`: its answer, with logprobs, is the reference
    later answers are judged by (loadtest/harness/verify.py: near ties apart)."""

    async def run() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            await learn_all(http, [(model, url + path, body) for model, body in plan], refs)

    asyncio.run(run())


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` (e.g. `lora_gateway_adapter_loads_total`) matching `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(HTTP.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def vllm_adapters(vllm_url: str) -> set[str]:
    """The LoRA adapters vLLM itself lists now."""
    data = HTTP.get(vllm_url + "/v1/models", headers=ENGINE_AUTH, timeout=10).json()["data"]
    return {m["id"] for m in data if m.get("parent")}


def held_stream(tiny_cache: dict[str, Path]) -> dict:
    """A stream whose client reads nothing: more bytes than the socket buffers hold (n=8, top-20
    logprobs, ~1 KB an event), so it keeps its lease until the client closes it, however slow or fast
    vLLM is. A stream holds its lease from its status line on."""
    context = json.loads((tiny_cache["base"] / "config.json").read_text())["max_position_embeddings"]
    body = {"prompt": PROMPT, "max_tokens": context - 64, "temperature": 1.0, "ignore_eos": True}
    return body | {"stream": True, "n": 8, "logprobs": 20}  # n > 1 needs sampling


def vllm_ran_adapters_since(vllm_url: str, since: float) -> set[str]:
    """The adapters vLLM's scheduler ran in any step since `since` (`time.time()`): every label set of
    `vllm:lora_requests_info` last set since then. Unlike a look at the latest step, a look that comes
    late (vLLM's frontend answers /metrics slowly while it generates on both cores) still sees them."""
    ran: set[str] = set()
    for family in text_string_to_metric_families(HTTP.get(vllm_url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "vllm:lora_requests_info" and sample.value >= since:
                ran |= {n for n in sample.labels.get("running_lora_adapters", "").split(",") if n}
    return ran


def vllm_running_adapters(vllm_url: str, *, waiting: bool = False) -> set[str]:
    """The adapters vLLM's scheduler ran (and with `waiting`, queued) in its latest step
    (`vllm:lora_requests_info`: one sample per label set, its value the time it was last set; the newest
    one is now)."""
    newest: tuple[float, set[str]] = (-1.0, set())
    for family in text_string_to_metric_families(HTTP.get(vllm_url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "vllm:lora_requests_info" and sample.value > newest[0]:
                running = sample.labels.get("running_lora_adapters", "")
                if waiting:
                    running += "," + sample.labels.get("waiting_lora_adapters", "")
                newest = (sample.value, {name for name in running.split(",") if name})
    return newest[1]


def leases(url: str) -> dict[str, dict[str, int]]:
    """Per engine name: leases the gateway acquired and released on its one engine."""
    return engine(url)["leases"]


def engine(url: str, token: str | None = None) -> dict:
    r = HTTP.get(url + "/admin/engines", headers=auth(token))
    assert r.status_code == 200, r.text
    [info] = r.json()["data"]
    return info


def settled_view(url: str, vllm_url: str, timeout: float = 10) -> tuple[set[str], dict]:
    """vLLM's listing and the gateway's engine info, once the gateway reports resident exactly what vLLM
    lists (read before and after the gateway's view, and unchanged)."""
    deadline = time.monotonic() + timeout
    while True:
        listed = vllm_adapters(vllm_url)
        info = engine(url)
        if listed == vllm_adapters(vllm_url) == set(info["resident_adapters"]):
            return listed, info
        assert time.monotonic() < deadline, (
            f"gateway: {sorted(info['resident_adapters'])}, vLLM: {sorted(listed)}"
        )
        time.sleep(0.1)


def assert_stopped(url: str) -> None:
    """A gateway left running would keep acting on the shared vLLM (loading, evicting) behind later tests."""
    try:
        httpx.get(url + "/health", timeout=2)
    except httpx.ConnectError:
        return
    raise AssertionError(f"the gateway at {url} still answers after serve_app() returned")


def rewrite_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
