"""`lora-gateway keys ...` and `lora-gateway usage`: a running gateway's API keys and what they used,
through its admin API (gateway/api/keys.py).

    lora-gateway keys create team-a --model 'sql*' --model tiny-llama --rpm 600 --tpm 200000 \\
        --max-concurrent 8 --max-tokens 1024 --expires 2027-06-30
    lora-gateway keys list
    lora-gateway keys show team-a
    lora-gateway keys update team-a --rpm 1200          # the secret stays
    lora-gateway keys rotate team-a --grace 3600        # a new secret; the old one works one more hour
    lora-gateway keys revoke team-a
    lora-gateway usage --key team-a --since 2026-12-01 [--csv]

`create` and `rotate` print the secret once, on stdout alone (`--json` for the whole answer), so
`KEY=$(lora-gateway keys create team-a)` keeps it. Same options as `lora-gateway adapters`: `--url`,
`--token`, `--json`; an error prints the gateway's message and exits with status 1.
"""

from __future__ import annotations

import csv
import sys
from typing import Annotated, Any
from urllib.parse import quote

import typer

from gateway.cli_adapters import DEFAULT_URL, JsonOpt, TokenOpt, UrlOpt, _when, emit_json, run, table

keys_app = typer.Typer(
    help="API keys of a running gateway: create, list, show, update, rotate, revoke.", no_args_is_help=True
)

RpmOpt = Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")]
TpmOpt = Annotated[int | None, typer.Option("--tpm", help="Prompt + completion tokens per minute.")]
ConcOpt = Annotated[int | None, typer.Option("--max-concurrent", help="Requests in flight at once.")]
MaxTokOpt = Annotated[int | None, typer.Option("--max-tokens", help="Largest max_tokens per request.")]
ExpiresOpt = Annotated[
    str | None, typer.Option("--expires", help="When the key stops working: ISO 8601 date/time or epoch.")
]
ModelOpt = Annotated[
    list[str] | None, typer.Option("--model", "-m", help="A model name or glob the key may call (repeat).")
]


def _path(name: str, action: str = "") -> str:
    return f"/admin/keys/{quote(name, safe='')}" + (f"/{action}" if action else "")


def _limits(rpm: int | None, tpm: int | None, conc: int | None, max_tokens: int | None) -> dict[str, int]:
    given = {
        "requests_per_minute": rpm,
        "tokens_per_minute": tpm,
        "max_concurrent": conc,
        "max_tokens": max_tokens,
    }
    return {k: v for k, v in given.items() if v is not None}


def _limits_text(limits: dict[str, Any]) -> str:
    short = {"requests_per_minute": "rpm", "tokens_per_minute": "tpm", "max_concurrent": "conc"}
    parts = [f"{short.get(k, k)}={v}" for k, v in limits.items() if v is not None]
    return " ".join(parts) or "-"


@keys_app.command()
def create(
    name: Annotated[str, typer.Argument(help="The key's name (in usage, logs and metrics).")],
    model: ModelOpt = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    max_concurrent: ConcOpt = None,
    max_tokens: MaxTokOpt = None,
    expires: ExpiresOpt = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a key; print its secret (shown this once)."""
    body: dict[str, Any] = {"name": name, "models": model or ["*"]}
    if limits := _limits(rpm, tpm, max_concurrent, max_tokens):
        body["limits"] = limits
    if expires:
        body["expires_at"] = expires
    data = run(url, token, "POST", "/admin/keys", body=body)
    if as_json:
        return emit_json(data)
    typer.echo(data["key"])
    typer.echo(f"created key {data['name']} for {', '.join(data['models'])} (shown once: keep it)", err=True)


@keys_app.command("list")
def list_cmd(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Every live key: name, where it is defined, models, limits, expiry. Never a secret."""
    data = run(url, token, "GET", "/admin/keys")
    if as_json:
        return emit_json(data)
    if not data["data"]:
        typer.echo("no API keys: inference is open")
        return
    rows = [["NAME", "SOURCE", "PREFIX", "MODELS", "LIMITS", "EXPIRES", "CREATED"]]
    for k in data["data"]:
        rows.append(
            [
                k["name"],
                k["source"],
                k.get("prefix") or "-",
                ",".join(k["models"]),
                _limits_text(k["limits"]),
                _when(k.get("expires_at")),
                _when(k.get("created_at")),
            ]
        )
    typer.echo(table(rows))


@keys_app.command()
def show(name: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """One key."""
    data = run(url, token, "GET", _path(name))
    if as_json:
        return emit_json(data)
    for field in ("name", "source", "prefix", "models", "limits", "expires_at", "created_at", "rotated_at"):
        value = data.get(field)
        if field == "limits":
            value = _limits_text(value or {})
        elif field.endswith("_at"):
            value = _when(value)
        elif isinstance(value, list):
            value = ", ".join(value)
        typer.echo(f"{field:<11} {value if value is not None else '-'}")


@keys_app.command()
def update(
    name: str,
    model: ModelOpt = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    max_concurrent: ConcOpt = None,
    max_tokens: MaxTokOpt = None,
    expires: ExpiresOpt = None,
    no_limits: Annotated[bool, typer.Option("--no-limits", help="Remove every limit.")] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a key's models, limits (the ones given replace all of them) or expiry; the secret stays."""
    body: dict[str, Any] = {}
    if model:
        body["models"] = model
    limits = _limits(rpm, tpm, max_concurrent, max_tokens)
    if limits or no_limits:
        body["limits"] = limits
    if expires:
        body["expires_at"] = expires
    data = run(url, token, "PATCH", _path(name), body=body)
    if as_json:
        return emit_json(data)
    typer.echo(f"updated key {name}: {', '.join(data['models'])}; limits {_limits_text(data['limits'])}")


@keys_app.command()
def rotate(
    name: str,
    grace: Annotated[float, typer.Option("--grace", help="Seconds the old secret keeps working.")] = 0,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give a key a new secret; print it (shown this once)."""
    data = run(url, token, "POST", _path(name, "rotate"), body={"grace_s": grace})
    if as_json:
        return emit_json(data)
    typer.echo(data["key"])
    after = f"for {grace:g} s more" if grace else "no more"
    typer.echo(f"rotated key {name}: the old secret works {after}", err=True)


@keys_app.command()
def revoke(name: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Revoke a key (every gateway on the registry refuses it within its poll interval)."""
    data = run(url, token, "DELETE", _path(name))
    if as_json:
        return emit_json(data)
    typer.echo(f"revoked key {name}")


USAGE_FIELDS = ["hour_start", "key", "model", "version", "requests", "prompt_tokens", "completion_tokens"]


def usage(
    key: Annotated[str | None, typer.Option("--key", help="One key's name.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="One model (adapter name or base).")] = None,
    since: Annotated[str | None, typer.Option("--since", help="From (ISO 8601 or epoch), inclusive.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Before (ISO 8601 or epoch).")] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV on stdout, with a header row.")] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Requests and tokens per key x model x version x hour, with totals."""
    params = {k: v for k, v in {"key": key, "model": model, "since": since, "until": until}.items() if v}
    data = run(url, token, "GET", "/admin/usage", params=params)
    if as_json:
        return emit_json(data)
    rows = data["data"]
    if as_csv:
        writer = csv.DictWriter(
            sys.stdout, fieldnames=USAGE_FIELDS, extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)
        return
    if not rows:
        typer.echo("no usage recorded")
        return
    out = [["HOUR (UTC)", "KEY", "MODEL", "VERSION", "REQUESTS", "PROMPT", "COMPLETION"]]
    for r in rows:
        out.append(
            [
                r["hour_start"],
                r["key"] or "-",
                r["model"],
                str(r["version"] or "-"),
                str(r["requests"]),
                str(r["prompt_tokens"]),
                str(r["completion_tokens"]),
            ]
        )
    totals = [sum(r[f] for r in rows) for f in ("requests", "prompt_tokens", "completion_tokens")]
    out.append(["total", "", "", "", *map(str, totals)])
    typer.echo(table(out))
