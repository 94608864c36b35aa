"""The `lora-gateway` command line.

    lora-gateway serve [--config FILE] [--engine-url URL | --model PATH] [--port 8000] ...
    lora-gateway models build-tiny        build the embedded default base model and demo adapters
    lora-gateway adapters register|list|show|remove|pin|unpin|alias ...   a running gateway's registry
                                          (gateway/cli_adapters.py)
    lora-gateway keys create|list|show|update|rotate|revoke ...   API keys (gateway/cli_keys.py)
    lora-gateway usage [--key K] [--since T] [--csv]              what each key used
    lora-gateway loadtest run|overhead|compare ...    load tests and benchmarks (loadtest/cli.py)
    lora-gateway train|merge|evaluate|build-demo ...  adapters as artifacts: fine-tune, merge, score
                                          (adapters/cli.py; `lora-gateway train --help`)

Heavy imports (uvicorn, torch, transformers) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from adapters.cli import app as adapter_tools_app
from gateway.cli_adapters import adapters_app
from gateway.cli_keys import keys_app, usage
from gateway.log import setup_logging
from loadtest.cli import app as loadtest_app

app = typer.Typer(help="Self-hosted multi-LoRA serving gateway in front of vLLM.", no_args_is_help=True)
models_app = typer.Typer(help="Base models: build the embedded default.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")
app.command("usage")(usage)
app.add_typer(loadtest_app, name="loadtest", help="Load tests and benchmarks (loadtest/).")
# train, merge, evaluate, build-demo as top-level commands; each imports torch/PEFT/TRL only when it runs.
app.registered_commands.extend(adapter_tools_app.registered_commands)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML or TOML settings file.")]


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    engine_url: Annotated[
        str | None, typer.Option(help="Attach to a vLLM server someone else runs (http://host:port).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Base model for the managed vLLM (folder or HF id).")
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="Name clients use for the base model.")
    ] = None,
    adapters_dir: Annotated[
        Path | None, typer.Option(help="Folder of PEFT adapter folders to serve.")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Where built models and demo adapters live.")] = None,
    vllm_port: Annotated[int | None, typer.Option(help="Port for the managed vLLM.")] = None,
    max_loras: Annotated[int | None, typer.Option(help="vLLM --max-loras.")] = None,
    max_lora_rank: Annotated[int | None, typer.Option(help="vLLM --max-lora-rank.")] = None,
    max_cpu_loras: Annotated[int | None, typer.Option(help="vLLM --max-cpu-loras.")] = None,
    vllm_arg: Annotated[
        list[str] | None, typer.Option(help="Extra vLLM argument, repeatable (--vllm-arg=--dtype=float32).")
    ] = None,
    allowed_root: Annotated[
        list[Path] | None,
        typer.Option(
            help="A folder local registrations may come from, beside registry.allowed_roots (repeatable)."
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Gateway processes on the port, over the same engines (docs/operations.md)."),
    ] = None,
    insecure_admin: Annotated[
        bool | None,
        typer.Option(
            "--insecure-admin",
            help="Listen on a non-loopback host with no admin token (auth.insecure_admin).",
        ),
    ] = None,
) -> None:
    """Start the gateway (and, in managed mode, the vLLM engine it supervises)."""
    import uvicorn

    from gateway.app import create_app
    from gateway.auth import admin_exposure_problem
    from gateway.settings import load_settings

    engine: dict[str, Any] = {
        "model": model,
        "served_model_name": served_model_name,
        "port": vllm_port,
        "max_loras": max_loras,
        "max_lora_rank": max_lora_rank,
        "max_cpu_loras": max_cpu_loras,
        "extra_args": vllm_arg or None,
    }
    if engine_url:
        engine.update(mode="attached", url=engine_url)
    settings = load_settings(
        config,
        host=host,
        port=port,
        adapters_dir=adapters_dir,
        cache_dir=cache_dir,
        log_level=log_level,
        workers=workers,
        engine=engine,
        auth={"insecure_admin": insecure_admin},
    )
    if allowed_root:
        roots = [*settings.registry.allowed_roots, *(p.expanduser().resolve() for p in allowed_root)]
        settings.registry.allowed_roots = roots
    if problem := admin_exposure_problem(settings):
        typer.echo(f"lora-gateway serve: {problem}", err=True)
        raise typer.Exit(2)
    setup_logging(settings.log_level)
    if settings.engine.mode == "managed" and settings.engine.model is None:
        _ensure_embedded(settings.cache_dir, settings.base_model_name(), demo=settings.adapters_dir is None)
    if settings.workers > 1:
        from gateway.workers import serve_workers

        serve_workers(settings, settings.workers)
        return
    from gateway.relay.client import RelayHttpProtocol

    uvicorn.run(
        create_app(settings),
        http=RelayHttpProtocol,  # uvicorn's httptools protocol, offering the client's socket to the relay
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.engine.stop_timeout_s),
        # The client address is the socket peer, never X-Forwarded-For: the admin routes' loopback rule
        # depends on it (gateway/auth.py).
        proxy_headers=False,
    )


def _ensure_embedded(cache_dir: Path, base_name: str, *, demo: bool) -> None:
    from adapters.tiny import build_tiny, is_built

    log = logging.getLogger("lora_gateway")
    if not is_built(cache_dir):
        log.info("building the embedded tiny base model into %s (first run only)", cache_dir)
    base = build_tiny(cache_dir)
    if demo:
        from adapters.demo import build_demo_adapters

        build_demo_adapters(cache_dir, base, base_name)


@models_app.command("build-tiny")
def build_tiny_cmd(
    config: ConfigOpt = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Cache folder (default ~/.cache/lora-gateway).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the cache is current.")] = False,
) -> None:
    """Build the embedded default base model (tiny Llama + tokenizer) and the demo adapters. Idempotent."""
    from adapters.demo import build_demo_adapters
    from adapters.tiny import TINY_NAME, build_tiny
    from gateway.settings import load_settings

    settings = load_settings(config, cache_dir=cache_dir)
    setup_logging(settings.log_level)
    base = build_tiny(settings.cache_dir, force=force)
    demos = build_demo_adapters(settings.cache_dir, base, TINY_NAME)
    typer.echo(f"base model: {base}")
    for name, path in demos.items():
        typer.echo(f"demo adapter {name}: {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
