"""`lora-gateway adapters ...` (gateway/cli_adapters.py) against a real in-process gateway over HTTP.

Registration validates against the base model's files, not against vLLM, so the gateway here is
attached to an address where nothing listens: no engine is needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from gateway.cli import app
from gateway.cli_adapters import source_arg
from tests.conftest import attached_settings, free_port, serve_app
from tests.registry_helpers import write_adapter

TOKEN = "cli-s3cret"


@pytest.fixture
def gw(cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "src"
    write_adapter(tiny_cache["base"], root / "v1", seed=61)
    write_adapter(tiny_cache["base"], root / "v2", seed=62)
    write_adapter(tiny_cache["base"], root / "rank32", seed=63, rank=32, target_modules=("q_proj",))
    nowhere = f"http://127.0.0.1:{free_port()}"
    settings = attached_settings(
        nowhere,
        cache_dir,
        tmp_path,
        registry={"allowed_roots": [root], "seed_adapters_dir": False},
        auth={"admin_token": TOKEN},
    )
    with serve_app(settings, wait_ready=False) as url:
        yield url, root


def cli(url: str, *args: str, token: str | None = TOKEN, code: int = 0) -> Result:
    env = {"LORA_GATEWAY_URL": url, **({"LORA_GATEWAY_ADMIN_TOKEN": token} if token else {})}
    result = CliRunner().invoke(app, ["adapters", *args], env=env)
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def test_adapter_lifecycle(gw: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    url, root = gw
    monkeypatch.chdir(root)
    out = cli(url, "register", "sql", "v1").stdout  # a relative path goes as an absolute one
    assert out.startswith("registered sql@1 (digest ") and "rank 8" in out
    assert f"source: {root / 'v1'}\n" in out and "sql resolves to sql@1 (newest)" in out

    out = cli(url, "register", "sql", str(root / "v2"), "--description", "second", "--pin").stdout
    assert "registered sql@2" in out and "sql resolves to sql@2 (newest), pinned" in out

    lines = cli(url, "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "CURRENT", "VERSIONS", "PINNED", "ALIAS", "UPDATED"]
    assert lines[1].split()[:5] == ["sql", "2", "1,2", "yes", "-"] and len(lines) == 2

    out = cli(url, "show", "sql").stdout
    assert "resolves to: sql@2 (newest)" in out and "pinned:      yes" in out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [(r[0], r[1], r[3]) for r in rows] == [("1", "ready", "8"), ("2", "ready", "8")]
    assert out.rstrip().endswith("(second)")

    assert cli(url, "alias", "sql", "1").stdout == "sql resolves to sql@1 (alias)\n"
    assert cli(url, "alias", "sql", "--clear").stdout == "sql resolves to sql@2 (newest)\n"
    assert "one of VERSION, --weights or --clear" in cli(url, "alias", "sql", code=2).stderr
    assert "one of VERSION" in cli(url, "alias", "sql", "1", "--weights", "1=5", code=2).stderr

    out = cli(url, "alias", "sql", "--weights", "1=90,2=10").stdout
    assert out == "sql resolves to sql@1 90%, sql@2 10% (canary)\n"
    assert cli(url, "list").stdout.splitlines()[1].split()[:5] == ["sql", "1", "1,2", "yes", "1=90,2=10"]
    assert "resolves to: sql@1 90%, sql@2 10% (canary)" in cli(url, "show", "sql").stdout
    assert "VERSION=WEIGHT" in cli(url, "alias", "sql", "--weights", "1:90", code=2).stderr
    err = cli(url, "alias", "sql", "--weights", "1=90,7=10", code=1).stderr
    assert "(code: version_not_found, param: version)" in err
    assert cli(url, "promote", "sql@2").stdout == "sql resolves to sql@2 (alias)\n"
    assert cli(url, "rollback", "sql").stdout == "sql resolves to sql@1 90%, sql@2 10% (canary)\n"
    assert cli(url, "rollback", "sql").stdout == "sql resolves to sql@2 (alias)\n"
    assert "NAME@VERSION" in cli(url, "promote", "sql", code=2).stderr
    assert cli(url, "alias", "sql", "--clear").stdout == "sql resolves to sql@2 (newest)\n"
    assert cli(url, "unpin", "sql").stdout == "sql unpinned\n"
    assert cli(url, "pin", "sql").stdout.startswith("sql pinned")

    assert cli(url, "remove", "sql", "--version", "1").stdout == "removed sql@1\n"
    shown = json.loads(cli(url, "show", "sql", "--json").stdout)
    assert [(v["version"], v["status"]) for v in shown["versions"]] == [(1, "retired"), (2, "ready")]
    assert shown["versions"][0]["source"] == str(root / "v1")

    listed = json.loads(cli(url, "list", "--json").stdout)["data"]
    assert [(a["name"], a["current_version"], a["pinned"]) for a in listed] == [("sql", 2, True)]
    assert cli(url, "remove", "sql").stdout == "removed sql@2\n"
    assert cli(url, "list").stdout == "no adapters registered\n"


def test_errors_print_the_message_and_code_and_exit_1(gw: tuple[str, Path], tmp_path: Path) -> None:
    url, root = gw
    err = cli(url, "show", "missing", code=1).stderr
    assert err == "error: No adapter named `missing`. (code: adapter_not_found, param: name)\n"

    err = cli(url, "list", token="wrong", code=1).stderr
    assert "(code: invalid_admin_token)" in err and err.startswith("error: A valid admin token is required")
    assert "invalid_admin_token" in cli(url, "list", token=None, code=1).stderr

    err = cli(url, "register", "big", str(root / "rank32"), code=1).stderr
    assert "max LoRA rank 16" in err and err.rstrip().endswith("(code: rank_too_large, param: r)")
    err = cli(url, "register", "far", str(tmp_path), "--no-upload", code=1).stderr
    assert "(code: source_not_allowed, param: source)" in err
    err = cli(url, "register", "far", str(tmp_path), code=1).stderr  # then uploaded: it holds no files
    assert "holds no files. (code: source_not_found, param: source)" in err
    err = cli(url, "register", "bad name", str(root / "v1"), code=1).stderr
    assert "(code: invalid_name, param: name)" in err
    err = cli(url, "alias", "sql", "3", code=1).stderr
    assert "(code: adapter_not_found" in err

    nowhere = f"http://127.0.0.1:{free_port()}"
    err = cli(url, "list", "--url", nowhere, code=1).stderr
    assert err.startswith(f"error: Cannot reach the gateway at {nowhere}")


def test_source_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert source_arg("hf://acme/sql-lora@v1") == "hf://acme/sql-lora@v1"
    assert source_arg("team/sql") == str(tmp_path / "team" / "sql")
    assert source_arg(f"file://{tmp_path}/a") == str(tmp_path / "a")
    assert source_arg("~/adapters/sql") == str(tmp_path / "home" / "adapters" / "sql")


def test_register_dir_registers_every_folder_and_reports_refusals(gw: tuple[str, Path]) -> None:
    url, root = gw
    result = cli(url, "register-dir", str(root), "--prefix", "team-", "--jobs", "2", code=1)
    assert result.stdout.startswith("2 registered, 1 refused, 0 skipped in ")
    assert "error: team-rank32: " in result.stderr and "(code: rank_too_large)" in result.stderr
    listed = json.loads(cli(url, "list", "--json").stdout)["data"]
    assert sorted(a["name"] for a in listed) == ["team-v1", "team-v2"]
    again = cli(url, "register-dir", str(root), "--prefix", "team-", "--skip-existing", "--json", code=1)
    data = json.loads(again.stdout)
    assert data["registered"] == [] and data["skipped"] == ["team-v1", "team-v2"]
    assert [r["name"] for r in data["refused"]] == ["team-rank32"]
    assert "no adapter folders" in cli(url, "register-dir", str(root / "v1"), code=2).stderr
