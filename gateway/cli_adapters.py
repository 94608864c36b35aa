"""`lora-gateway adapters ...`: the adapter registry of a running gateway, through its admin API.

    lora-gateway adapters register sql /srv/adapters/sql --description "SQL v2" --pin
    lora-gateway adapters register sql hf://acme/sql-lora --revision main      # recorded as the commit sha
    lora-gateway adapters list
    lora-gateway adapters show sql
    lora-gateway adapters alias sql 1          # `sql` resolves to version 1 ...
    lora-gateway adapters alias sql --clear    # ... and back to the newest version
    lora-gateway adapters pin sql | unpin sql
    lora-gateway adapters remove sql --version 1      # or the whole adapter without --version

Every command takes `--url` (env `LORA_GATEWAY_URL`, default http://127.0.0.1:8000), `--token`
(env `LORA_GATEWAY_ADMIN_TOKEN`) and `--json` (print the admin API's answer as is). A refusal prints the
gateway's OpenAI-shaped error (message, code, param) on stderr and exits with status 1.
"""

from __future__ import annotations

import json
import os
import time
from typing import Annotated, Any
from urllib.parse import quote

import typer

from gateway.admin_client import AdminError, call

DEFAULT_URL = "http://127.0.0.1:8000"

adapters_app = typer.Typer(
    help="Adapters of a running gateway: register, list, show, remove, pin, alias.", no_args_is_help=True
)

UrlOpt = Annotated[str, typer.Option("--url", envvar="LORA_GATEWAY_URL", help="The gateway's base URL.")]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="LORA_GATEWAY_ADMIN_TOKEN", help="Admin token (auth.admin_token)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the admin API's JSON answer.")]


def run(url: str, token: str | None, method: str, path: str, **kw: Any) -> Any:
    """`gateway.admin_client.call`, turning an error into a message on stderr and exit status 1."""
    try:
        return call(url, token, method, path, **kw)
    except AdminError as exc:
        details = ", ".join(f"{k}: {v}" for k, v in (("code", exc.code), ("param", exc.param)) if v)
        typer.echo(f"error: {exc.message}" + (f" ({details})" if details else ""), err=True)
        raise typer.Exit(1) from None


def _path(name: str, action: str = "") -> str:
    return f"/admin/adapters/{quote(name, safe='')}" + (f"/{action}" if action else "")


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _resolves_to(adapter: dict[str, Any]) -> str:
    current = adapter.get("current_version")
    if current is None:
        return "nothing"
    how = "alias" if adapter.get("alias_version") else "newest"
    return f"{adapter['name']}@{current} ({how})"


def source_arg(source: str) -> str:
    """hf:// goes as is; a local path goes as an absolute path (the gateway checks it against its roots)."""
    if source.startswith("hf://"):
        return source
    return os.path.abspath(os.path.expanduser(source.removeprefix("file://")))


@adapters_app.command()
def register(
    name: Annotated[str, typer.Argument(help="The name clients put in `model`.")],
    source: Annotated[str, typer.Argument(help="A PEFT folder under an allowed root, or hf://org/repo.")],
    revision: Annotated[str | None, typer.Option(help="hf:// only: branch, tag or commit.")] = None,
    description: Annotated[str, typer.Option(help="Free text kept with the version.")] = "",
    pin: Annotated[bool, typer.Option("--pin", help="Keep it resident on every engine.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Accept an adapter trained for another base (recorded).")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a new version of NAME from SOURCE (validated before anything reaches vLLM)."""
    body = {
        "name": name,
        "source": source_arg(source),
        "revision": revision,
        "description": description,
        "pin": pin,
        "force": force,
    }
    data = run(url, token, "POST", "/admin/adapters", body=body)
    if as_json:
        return emit_json(data)
    v = data["registered"]
    typer.echo(
        f"registered {v['model']} (digest {v['digest'][:12]}, rank {v['rank']}, {_size(v['size_bytes'])})"
    )
    typer.echo(f"  source: {v['source']}" + (f" @ {v['revision']}" if v["revision"] else ""))
    if v["forced_base"]:
        typer.echo("  warning: trained for another base model (accepted with --force)")
    if data.get("adapter"):
        pinned = ", pinned" if data["adapter"]["pinned"] else ""
        typer.echo(f"  {name} resolves to {_resolves_to(data['adapter'])}{pinned}")


@adapters_app.command("list")
def list_cmd(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Every adapter with a ready version: what its name resolves to, its versions, pin and alias."""
    data = run(url, token, "GET", "/admin/adapters")
    if as_json:
        return emit_json(data)
    adapters = data["data"]
    if not adapters:
        typer.echo("no adapters registered")
        return
    rows = [["NAME", "CURRENT", "VERSIONS", "PINNED", "ALIAS", "UPDATED"]]
    for a in adapters:
        ready = [str(v["version"]) for v in a["versions"] if v["status"] == "ready"]
        rows.append(
            [
                a["name"],
                str(a["current_version"] or "-"),
                ",".join(ready),
                "yes" if a["pinned"] else "no",
                str(a["alias_version"] or "-"),
                _when(a["updated_at"]),
            ]
        )
    typer.echo(table(rows))


@adapters_app.command()
def show(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One adapter and all its versions, retired ones included."""
    a = run(url, token, "GET", _path(name))
    if as_json:
        return emit_json(a)
    typer.echo(f"name:        {a['name']}")
    typer.echo(f"resolves to: {_resolves_to(a)}")
    typer.echo(f"pinned:      {'yes' if a['pinned'] else 'no'}")
    rows = [["VERSION", "STATUS", "DIGEST", "RANK", "SIZE", "CREATED", "SOURCE"]]
    for v in a["versions"]:
        source = v["source"] + (f"@{v['revision'][:12]}" if v["revision"] else "")
        notes = [
            *(["forced base"] if v["forced_base"] else []),
            *([v["description"]] if v["description"] else []),
        ]
        rows.append(
            [
                str(v["version"]),
                v["status"],
                v["digest"][:12],
                str(v["rank"]),
                _size(v["size_bytes"]),
                _when(v["created_at"]),
                source + (f"  ({'; '.join(notes)})" if notes else ""),
            ]
        )
    typer.echo(table(rows))


@adapters_app.command()
def remove(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    version: Annotated[int | None, typer.Option(help="Retire only this version.")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Retire an adapter (or one version); requests in flight finish first."""
    params = {"version": version} if version is not None else None
    data = run(url, token, "DELETE", _path(name), params=params)
    if as_json:
        return emit_json(data)
    typer.echo("removed " + ", ".join(v["model"] for v in data["removed"]))


def _pin(name: str, pinned: bool, url: str, token: str | None, as_json: bool) -> None:
    a = run(url, token, "POST", _path(name, "pin" if pinned else "unpin"))
    if as_json:
        return emit_json(a)
    typer.echo(f"{name} {'pinned: kept resident on every engine' if pinned else 'unpinned'}")


@adapters_app.command()
def pin(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Keep NAME resident on every engine (restored after engine restarts, never evicted)."""
    _pin(name, True, url, token, as_json)


@adapters_app.command()
def unpin(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Let NAME be evicted again when it is idle."""
    _pin(name, False, url, token, as_json)


@adapters_app.command()
def alias(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    version: Annotated[int | None, typer.Argument(help="The version NAME should resolve to.")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Resolve to the newest version again.")] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make NAME resolve to VERSION instead of the newest one (--clear undoes it)."""
    if (version is None) == (not clear):
        typer.echo("error: give either VERSION or --clear", err=True)
        raise typer.Exit(2)
    if clear:
        a = run(url, token, "DELETE", _path(name, "alias"))
    else:
        a = run(url, token, "PUT", _path(name, "alias"), body={"version": version})
    if as_json:
        return emit_json(a)
    typer.echo(f"{name} resolves to {_resolves_to(a)}")
