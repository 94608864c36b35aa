"""`lora-gateway adapters ...`: the adapter registry of a running gateway, through its admin API.

    lora-gateway adapters register sql /srv/adapters/sql --description "SQL v2" --pin
    lora-gateway adapters register sql ./out/sql --url https://gw.example   # uploaded: no shared disk
    lora-gateway adapters register sql hf://acme/sql-lora --revision main      # recorded as the commit sha
    lora-gateway adapters register sql s3://models/sql-lora                 # each object's version recorded
    lora-gateway adapters register-dir /srv/adapters --skip-existing --jobs 8   # every folder in it
    lora-gateway adapters list
    lora-gateway adapters show sql
    lora-gateway adapters alias sql 1          # `sql` resolves to version 1 ...
    lora-gateway adapters alias sql --clear    # ... and back to the newest version
    lora-gateway adapters alias sql --weights 3=90,4=10   # a canary, sticky per end user
    lora-gateway adapters promote sql@4 --eval held_out.jsonl --min-gain 0.02   # only if 4 is better
    lora-gateway adapters rollback sql         # the routing before the last change
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
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import typer

from gateway.admin_client import AdminError, call, register_folder

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


def fail(exc: AdminError) -> NoReturn:
    """The gateway's refusal on stderr (message, code, param), exit status 1."""
    typer.echo(f"error: {exc.describe()}", err=True)
    raise typer.Exit(1) from None


def run(url: str, token: str | None, method: str, path: str, **kw: Any) -> Any:
    """`gateway.admin_client.call`, turning an error into a message on stderr and exit status 1."""
    try:
        return call(url, token, method, path, **kw)
    except AdminError as exc:
        fail(exc)


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
    if weights := adapter.get("alias_weights"):
        total = sum(weights.values())
        parts = [f"{adapter['name']}@{v} {100 * w / total:.0f}%" for v, w in weights.items()]
        return ", ".join(parts) + " (canary)"
    how = "alias" if adapter.get("alias_version") else "newest"
    return f"{adapter['name']}@{current} ({how})"


def _routed(name: str, adapter: dict[str, Any], as_json: bool) -> None:
    """What a routing change answers: the adapter as JSON, or where its name goes now."""
    if as_json:
        return emit_json(adapter)
    typer.echo(f"{name} resolves to {_resolves_to(adapter)}")


def _alias_column(adapter: dict[str, Any]) -> str:
    if weights := adapter.get("alias_weights"):
        return ",".join(f"{v}={w}" for v, w in weights.items())
    return str(adapter.get("alias_version") or "-")


def parse_weights(text: str) -> dict[str, int]:
    """`3=90,4=10` -> {"3": 90, "4": 10}; a typer.BadParameter on anything else."""
    weights: dict[str, int] = {}
    for part in text.split(","):
        version, sep, weight = part.strip().partition("=")
        if not sep or not version.strip().isdigit() or not weight.strip().isdigit():
            raise typer.BadParameter(f"{part.strip()!r}: expected VERSION=WEIGHT, as in 3=90,4=10")
        weights[str(int(version))] = int(weight)
    return weights


def source_arg(source: str) -> str:
    """hf:// and s3:// go as they are; a local path as an absolute path."""
    if is_remote_source(source):
        return source
    return os.path.abspath(os.path.expanduser(source.removeprefix("file://")))


def is_remote_source(source: str) -> bool:
    """A source the gateway fetches itself (hf://, s3://), not a folder on this machine."""
    return source.startswith(("hf://", "s3://"))


@adapters_app.command()
def register(
    name: Annotated[str, typer.Argument(help="The name clients put in `model`.")],
    source: Annotated[
        str,
        typer.Argument(
            help="A PEFT folder (sent by path or uploaded), hf://org/repo[@rev] or s3://bucket/prefix."
        ),
    ],
    revision: Annotated[str | None, typer.Option(help="hf:// only: branch, tag or commit.")] = None,
    description: Annotated[str, typer.Option(help="Free text kept with the version.")] = "",
    pin: Annotated[bool, typer.Option("--pin", help="Keep it resident on every engine.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Accept an adapter trained for another base (recorded).")
    ] = False,
    upload: Annotated[
        bool | None,
        typer.Option(
            "--upload/--no-upload",
            help="A folder: send its files (--upload) or only its path (--no-upload). Default: the path to a "
            "gateway on this machine, uploading if it cannot read the folder; the files to any other.",
        ),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a new version of NAME from SOURCE (validated before anything reaches vLLM)."""
    if is_remote_source(source):
        body = {
            "name": name,
            "source": source,
            "revision": revision,
            "description": description,
            "pin": pin,
            "force": force,
        }
        data = run(url, token, "POST", "/admin/adapters", body=body)
    else:
        if revision:
            raise typer.BadParameter("--revision only applies to hf:// sources")
        try:
            data = register_folder(
                url,
                token,
                name,
                source_arg(source),
                upload=upload,
                description=description,
                pin=pin,
                force=force,
            )
        except AdminError as exc:
            fail(exc)
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
                _alias_column(a),
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
    weights: Annotated[
        str | None,
        typer.Option(help="A canary: VERSION=WEIGHT,... (3=90,4=10), each end user kept on one version."),
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Resolve to the newest version again.")] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make NAME resolve to VERSION, or split it between versions by --weights (--clear undoes it)."""
    if sum(x is not None and x is not False for x in (version, weights, clear)) != 1:
        typer.echo("error: give one of VERSION, --weights or --clear", err=True)
        raise typer.Exit(2)
    if clear:
        a = run(url, token, "DELETE", _path(name, "alias"))
    elif weights is not None:
        a = run(url, token, "PUT", _path(name, "alias"), body={"weights": parse_weights(weights)})
    else:
        a = run(url, token, "PUT", _path(name, "alias"), body={"version": version})
    _routed(name, a, as_json)


@adapters_app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put back NAME's routing as it was before its last alias change, promotion or canary."""
    a = run(url, token, "POST", _path(name, "rollback"))
    _routed(name, a, as_json)


@adapters_app.command()
def promote(
    model: Annotated[str, typer.Argument(help="The version to promote, as NAME@VERSION (sql@4).")],
    eval_data: Annotated[
        Path | None,
        typer.Option("--eval", help="Held-out JSONL: promote only if the version scores better on it."),
    ] = None,
    min_gain: Annotated[
        float, typer.Option(help="With --eval: how much better than the current version (and the base).")
    ] = 0.02,
    metric: Annotated[str, typer.Option(help="With --eval: token_f1 or exact_match.")] = "token_f1",
    max_tokens: Annotated[int, typer.Option(help="With --eval: greedy generation length.")] = 64,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="LORA_GATEWAY_API_KEY", help="With --eval: an inference API key."),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make NAME resolve to VERSION (ending a canary). With --eval, only when it beats what NAME serves
    now by --min-gain; the scores are stored on the version either way (`adapters show`)."""
    from gateway.rollout import promote_with_eval, split_model

    try:
        name, version = split_model(model)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if eval_data is None:
        a = run(url, token, "PUT", _path(name, "alias"), body={"version": version})
        return _routed(name, a, as_json)
    from adapters.data import DatasetError

    try:
        p = promote_with_eval(
            url, token, api_key, model, eval_data, metric=metric, min_gain=min_gain, max_tokens=max_tokens,
            progress=lambda line: typer.echo(line, err=as_json),
        )  # fmt: skip
    except AdminError as exc:
        fail(exc)
    except (ValueError, DatasetError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        emit_json(
            {
                "promoted": p.promoted,
                "reason": p.reason,
                "metric": p.metric,
                "scores": {
                    k: {"exact_match": r.exact_match, "token_f1": r.token_f1} for k, r in p.scores.items()
                },
            }
        )
    elif p.promoted:
        typer.echo(f"promoted {model}: {p.metric} {p.reason}")
    else:
        typer.echo(f"not promoted, nothing changed: {p.metric} {p.reason}")
    if not p.promoted:
        raise typer.Exit(1)


@adapters_app.command("register-dir")
def register_dir(
    folder: Annotated[
        Path, typer.Argument(help="A folder of PEFT adapter folders; each is registered under its name.")
    ],
    prefix: Annotated[str, typer.Option(help="Put before each folder's name (team-a- -> team-a-sql).")] = "",
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing", help="Leave names that are registered already as they are.")
    ] = False,
    jobs: Annotated[int, typer.Option(min=1, max=32, help="Registrations in flight at once.")] = 4,
    upload: Annotated[
        bool | None,
        typer.Option(
            "--upload/--no-upload", help="As for `register`: files or paths (default: decided per gateway)."
        ),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register every adapter folder in FOLDER (one new version each), `jobs` at a time, with progress;
    exit 1 if any was refused (the others are registered)."""
    from concurrent.futures import ThreadPoolExecutor

    subs = sorted(p for p in folder.expanduser().iterdir() if (p / "adapter_config.json").is_file())
    if not subs:
        typer.echo(f"error: no adapter folders (with adapter_config.json) in {folder}", err=True)
        raise typer.Exit(2)
    existing: set[str] = set()
    if skip_existing:
        existing = {a["name"] for a in run(url, token, "GET", "/admin/adapters")["data"]}
    todo = [(prefix + p.name, p) for p in subs if prefix + p.name not in existing]
    started = time.monotonic()
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []

    def one(item: tuple[str, Path]) -> tuple[str, Any, AdminError | None]:
        name, path = item
        try:
            return name, register_folder(url, token, name, path, upload=upload), None
        except AdminError as exc:
            return name, None, exc

    with ThreadPoolExecutor(jobs) as pool:
        for i, (name, data, exc) in enumerate(pool.map(one, todo), 1):
            if exc is None:
                done.append({"name": name, "model": data["registered"]["model"]})
            else:
                failed.append({"name": name, "message": exc.message, "code": exc.code})
                typer.echo(f"error: {name}: {exc.message} (code: {exc.code})", err=True)
            if not as_json and (i % 50 == 0 or i == len(todo)):
                rate = i / max(time.monotonic() - started, 1e-9)
                typer.echo(
                    f"registered {len(done)}/{len(todo)}, {len(failed)} refused ({rate:.0f}/s)", err=True
                )
    if as_json:
        emit_json(
            {
                "registered": done,
                "refused": failed,
                "skipped": sorted(existing & {prefix + p.name for p in subs}),
            }
        )
    else:
        took = time.monotonic() - started
        typer.echo(
            f"{len(done)} registered, {len(failed)} refused, {len(subs) - len(todo)} skipped in {took:.1f} s"
        )
    if failed:
        raise typer.Exit(1)
