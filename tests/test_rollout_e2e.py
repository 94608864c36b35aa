"""Rolling an adapter out through a real gateway on the session's vLLM: an uploaded version served,
a weighted canary (proportions over many distinct users, each user sticky to one version, per-version
metrics), promotion gated on a held-out evaluation (refused for a worse version, accepted for a better
one), rollback.

Real vLLM, real SQLite, real HTTP, the official OpenAI SDK and `lora-gateway adapters ...` itself.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner, Result

from gateway.cli import app
from tests.conftest import serve_app
from tests.registry_helpers import register, registry_settings, write_adapter
from tests.s3_server import new_bucket, s3_client, s3_endpoint, s3_env

__all__ = ["s3_endpoint"]  # the session fixture, used below

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[1]


def cli(url: str, *args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(app, ["adapters", *args], env={"LORA_GATEWAY_URL": url})
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def version_counts(url: str, name: str) -> Counter[int]:
    """lora_gateway_version_requests_total{model=name, status="200"} by version, from /metrics."""
    counts: Counter[int] = Counter()
    labels = rf'model="{re.escape(name)}",status="200",version="(\d+)"'
    pattern = re.compile(rf"^lora_gateway_version_requests_total\{{{labels}\}} (\S+)$")
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if m := pattern.match(line):
            counts[int(m.group(1))] += int(float(m.group(2)))
    return counts


def test_an_uploaded_adapter_is_served(
    vllm_url: str, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path
) -> None:
    """The gateway's roots do not hold the folder: `register` uploads it, and vLLM serves those bytes."""
    gateway_root = tmp_path / "gateway-only"
    gateway_root.mkdir()
    elsewhere = write_adapter(tiny_cache["base"], tmp_path / "laptop" / "out" / "sql", seed=313)
    reference = write_adapter(tiny_cache["base"], gateway_root / "same", seed=313)  # the same bytes
    settings = registry_settings(vllm_url, cache_dir, tmp_path, gateway_root)
    with serve_app(settings) as url:
        out = cli(url, "register", "uploaded", str(elsewhere)).stdout
        assert out.startswith("registered uploaded@1")
        register(url, "by-path", reference)
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            prompt = "show users older than 30"
            answers = [
                client.completions.create(model=m, prompt=prompt, max_tokens=8, temperature=0)
                for m in ("uploaded", "by-path", "tiny-llama")
            ]
        assert answers[0].model == "uploaded"
        assert answers[0].choices[0].text == answers[1].choices[0].text, "the uploaded bytes are served"
        assert answers[0].choices[0].text != answers[2].choices[0].text, "an adapter, not the base"


def test_an_s3_adapter_is_served(
    vllm_url: str,
    cache_dir: Path,
    tiny_cache: dict[str, Path],
    tmp_path: Path,
    s3_endpoint: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An adapter put in a bucket of a real S3-compatible server, registered by s3:// through the admin
    API, is what vLLM serves: the same answers as the same bytes registered from a folder."""
    s3_env(monkeypatch, s3_endpoint)
    client = s3_client()
    bucket = new_bucket(client, versioned=True)
    folder = write_adapter(tiny_cache["base"], tmp_path / "gateway-side" / "same", seed=515)
    for path in folder.iterdir():
        client.put_object(Bucket=bucket, Key=f"team/sql/{path.name}", Body=path.read_bytes())
    settings = registry_settings(vllm_url, cache_dir, tmp_path, folder.parent)
    with serve_app(settings) as url:
        out = cli(url, "register", "from-s3", f"s3://{bucket}/team/sql").stdout
        assert out.startswith("registered from-s3@1") and f"source: s3://{bucket}/team/sql @ " in out
        v = json.loads(cli(url, "show", "from-s3", "--json").stdout)["versions"][0]
        assert re.fullmatch(r"[0-9a-f]{64}", v["revision"]), "the objects' versions, recorded"
        by_path = register(url, "by-path", folder)["registered"]
        assert by_path["digest"] == v["digest"], "the same bytes"
        prompt = {"prompt": "show users older than 30", "max_tokens": 8, "temperature": 0}
        texts = [
            httpx.post(url + "/v1/completions", json={"model": m, **prompt}, timeout=120).json()["choices"][
                0
            ]["text"]
            for m in ("from-s3", "tiny-llama")
        ]
        assert texts[0] != texts[1], "served as an adapter"


def test_a_weighted_canary_splits_by_user_and_rolls_back(
    vllm_url: str, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "src"
    for version, seed in ((1, 401), (2, 402)):
        write_adapter(tiny_cache["base"], root / f"v{version}", seed=seed)
    settings = registry_settings(vllm_url, cache_dir, tmp_path, root)
    with serve_app(settings) as url:
        register(url, "chat", root / "v1")
        register(url, "chat", root / "v2")
        assert "(canary)" in cli(url, "alias", "chat", "--weights", "1=90,2=10").stdout

        def ask(user: str, *, header: bool = False) -> int:
            body = {"model": "chat", "prompt": "hi", "max_tokens": 1, "temperature": 0}
            headers = {"x-lora-gateway-user": user} if header else {}
            if not header:
                body["user"] = user
            r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "chat", "the client's name comes back, not a version"
            return 1

        before = version_counts(url, "chat")
        with ThreadPoolExecutor(16) as pool:
            assert sum(pool.map(lambda i: ask(f"user-{i}"), range(1000))) == 1000
        split = version_counts(url, "chat") - before
        assert split.total() == 1000, split
        assert 0.06 <= split[2] / 1000 <= 0.14, f"90/10 over 1,000 distinct users: {dict(split)}"

        # One user, many requests: always the same version (by `user`, and by the sticky header).
        for user, header in (("alice", False), ("bob", False), ("carol", True), ("dave", True)):
            before = version_counts(url, "chat")
            for _ in range(12):
                ask(user, header=header)
            seen = version_counts(url, "chat") - before
            assert len(seen) == 1 and seen.total() == 12, (user, dict(seen))

        shown = json.loads(cli(url, "show", "chat", "--json").stdout)
        assert shown["alias_weights"] == {"1": 90, "2": 10} and shown["current_version"] == 1
        assert "chat@2 (alias)" in cli(url, "promote", "chat@2").stdout
        before = version_counts(url, "chat")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: ask(f"user-{i}"), range(40)))
        assert version_counts(url, "chat") - before == Counter({2: 40}), "promoted: all on version 2"
        assert "(canary)" in cli(url, "rollback", "chat").stdout
        assert json.loads(cli(url, "show", "chat", "--json").stdout)["alias_weights"] == {"1": 90, "2": 10}
        r = httpx.post(url + "/admin/adapters/chat/rollback", timeout=30)
        assert r.status_code == 200  # back to the promotion: a second rollback undoes the first
        r = httpx.put(url + "/admin/adapters/chat/alias", json={"weights": {"1": 0}}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_weights"
        both = {"version": 1, "weights": {"1": 5}}
        r = httpx.put(url + "/admin/adapters/chat/alias", json=both, timeout=30)
        assert r.status_code == 400


def test_promotion_is_gated_on_a_held_out_evaluation(
    vllm_url: str, cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path
) -> None:
    """`sql` v1 is the pirate demo adapter (wrong task), v2 the SQL one, v3 random weights: v2 beats v1
    and the base and is promoted; v3 is worse than v2 and is refused, nothing changed."""
    held_out = tmp_path / "held_out.jsonl"
    rows = (REPO / "adapters" / "datasets" / "sql" / "held_out.jsonl").read_text().splitlines()[:8]
    held_out.write_text("\n".join(rows) + "\n")
    root = tmp_path / "src"
    write_adapter(tiny_cache["base"], root / "random", seed=777)
    settings = registry_settings(vllm_url, cache_dir, tmp_path, root)
    settings.registry.allowed_roots.append(tiny_cache["demo-a"].parent)
    with serve_app(settings) as url:
        register(url, "sql", tiny_cache["demo-b"])
        register(url, "sql", tiny_cache["demo-a"])
        cli(url, "alias", "sql", "1")
        out = cli(url, "promote", "sql@2", "--eval", str(held_out), "--min-gain", "0.05").stdout
        assert "promoted sql@2" in out, out
        shown = json.loads(cli(url, "show", "sql", "--json").stdout)
        assert shown["current_version"] == 2 and shown["alias_version"] == 2
        scores = shown["versions"][1]["evaluation"]
        assert scores["metric"] == "token_f1" and scores["dataset"] == "held_out.jsonl"
        assert scores["score"] >= scores["compared"]["current"]["token_f1"] + 0.05
        assert scores["decision"].startswith("promoted")
        assert shown["versions"][0]["evaluation"]["compared"]["candidate"]["token_f1"] == scores["score"]

        register(url, "sql", root / "random")
        result = cli(url, "promote", "sql@3", "--eval", str(held_out), code=1)
        assert "not promoted, nothing changed" in result.stdout, result.stdout
        shown = json.loads(cli(url, "show", "sql", "--json").stdout)
        assert shown["current_version"] == 2 and shown["alias_version"] == 2, "routing unchanged"
        assert shown["versions"][2]["evaluation"]["decision"].startswith("not promoted")
