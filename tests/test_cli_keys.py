"""`lora-gateway keys ...` and `lora-gateway usage` (gateway/cli_keys.py) against a real in-process gateway
over HTTP, with an in-memory vLLM behind it (tests/fake_engine.py) so the keys can be used."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from gateway.cli import app
from gateway.settings import Settings
from tests.conftest import serve_app
from tests.fake_engine import FakeEngineClient, FakeVllm

TOKEN = "cli-s3cret"
ENGINE = "http://engine-a.invalid:8000"


@pytest.fixture
def gw(cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path) -> Iterator[tuple[str, str]]:
    engine = {"mode": "attached", "url": ENGINE, "health_interval_s": 0.05}
    settings = Settings(
        cache_dir=cache_dir, data_dir=tmp_path / "data", engine=engine, auth={"admin_token": TOKEN}
    )
    base = settings.base_model_name()
    with serve_app(settings, engine_client=FakeEngineClient({ENGINE: FakeVllm(base)})) as url:
        yield url, base


def cli(url: str, *args: str, code: int = 0) -> Result:
    env = {"LORA_GATEWAY_URL": url, "LORA_GATEWAY_ADMIN_TOKEN": TOKEN}
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def chat(url: str, secret: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"})


def test_keys_lifecycle_and_usage(gw: tuple[str, str]) -> None:
    url, base = gw
    created = cli(url, "keys", "create", "team-a", "--model", base, "--rpm", "100", "--max-tokens", "64")
    secret = created.stdout.strip()
    assert secret.startswith("lgw-") and "\n" not in secret, "stdout is the secret alone: KEY=$(...) keeps it"
    assert "shown once" in created.stderr
    assert chat(url, secret, base).status_code == 200

    lines = cli(url, "keys", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "PREFIX", "MODELS", "LIMITS", "EXPIRES", "CREATED"]
    assert lines[1].split()[:5] == ["team-a", "api", secret[:8], base, "rpm=100"] and secret not in "\n".join(
        lines
    )
    assert "max_tokens=64" in cli(url, "keys", "show", "team-a").stdout

    out = cli(url, "keys", "update", "team-a", "--rpm", "5").stdout
    assert "rpm=5" in out and "max_tokens" not in out, "the limits given replace all of them"
    new = cli(url, "keys", "rotate", "team-a", "--grace", "60").stdout.strip()
    assert (
        new != secret
        and chat(url, new, base).status_code == 200
        and chat(url, secret, base).status_code == 200
    )

    rows = list(csv.DictReader(io.StringIO(cli(url, "usage", "--key", "team-a", "--csv").stdout)))
    assert [(r["key"], r["model"], r["requests"]) for r in rows] == [("team-a", base, "3")]
    table = cli(url, "usage").stdout.splitlines()
    assert table[0].split()[:3] == ["HOUR", "(UTC)", "KEY"] and table[-1].split()[:2] == ["total", "3"]
    data = json.loads(cli(url, "usage", "--json").stdout)["data"]
    assert data[0]["prompt_tokens"] == 9

    assert cli(url, "keys", "revoke", "team-a").stdout.strip() == "revoked key team-a"
    assert chat(url, new, base).status_code == 401
    err = cli(url, "keys", "revoke", "team-a", code=1).stderr
    assert "No API key named 'team-a'" in err and "code: key_not_found" in err
    cli(url, "keys", "create", "dup")
    assert "code: key_exists" in cli(url, "keys", "create", "dup", code=1).stderr
