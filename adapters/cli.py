"""`lora-gateway` commands about adapters as artifacts: train, merge, evaluate, build-demo, train-bench.

Importing this module is cheap (typer only): torch, transformers, PEFT and TRL are imported by the
command that needs them. The gateway's CLI mounts these commands (`app.registered_commands`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Train, evaluate and merge LoRA adapters.", no_args_is_help=True, add_completion=False)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def train(ctx: typer.Context) -> None:
    """Fine-tune a LoRA adapter with PEFT + TRL (`lora-gateway train --help` lists every option)."""
    from adapters.train import cli

    raise typer.Exit(cli(list(ctx.args)))


@app.command()
def merge(
    base: Annotated[str, typer.Option(help="Base model folder, `tiny-llama` or Hugging Face id.")],
    adapter: Annotated[Path, typer.Option(help="PEFT adapter folder.")],
    out: Annotated[Path, typer.Option(help="Output folder for the merged model.")],
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """Merge an adapter into its base: a full model vLLM serves without --enable-lora."""
    from adapters.merge import merge_adapter

    try:
        merge_adapter(base, adapter, out, overwrite=overwrite)
    except (FileExistsError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"merged model written to {out}")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="Held-out JSONL (prompt/completion or chat messages).")],
    url: Annotated[str | None, typer.Option(help="OpenAI-compatible server (e.g. the gateway).")] = None,
    model: Annotated[str | None, typer.Option(help="Model name to ask the server for (with --url).")] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="OPENAI_API_KEY", help="Bearer key for --url.")
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="In process: base model (folder, tiny-llama, hub id).")
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="In process: adapter to compare with the base.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy generation length.")] = 64,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the JSON result here.")
    ] = None,
) -> None:
    """Greedy exact match and token F1 on a held-out set: through a server, or base vs adapter."""
    from adapters.data import DatasetError, load_jsonl

    try:
        dataset = load_jsonl(data)
    except DatasetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if url:
        if not model:
            raise typer.BadParameter("--model is required with --url")
        from adapters.evaluate import evaluate_endpoint

        result = {
            "url": url,
            "model": model,
            **evaluate_endpoint(url, model, dataset, api_key=api_key, max_tokens=max_new_tokens).as_dict(),
        }
    elif base:
        result = _evaluate_in_process(base, adapter, dataset, max_new_tokens)
    else:
        raise typer.BadParameter("give --url and --model, or --base (and optionally --adapter)")
    text = json.dumps(result, indent=2)
    if output:
        output.write_text(text + "\n")
    typer.echo(text)


def _evaluate_in_process(base: str, adapter: Path | None, dataset: object, max_new_tokens: int) -> dict:
    from adapters.evaluate import compare_base_adapter, evaluate_model

    if adapter is not None:
        from adapters.merge import load_base_and_adapter

        peft_model, tokenizer = load_base_and_adapter(base, adapter)
        return compare_base_adapter(peft_model, tokenizer, dataset, max_new_tokens=max_new_tokens)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.artifacts import resolve_base

    folder = resolve_base(base)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return {"base": evaluate_model(model, tokenizer, dataset, max_new_tokens=max_new_tokens).as_dict()}


@app.command("build-demo")
def build_demo(
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Cache folder (default: $LORA_GATEWAY_CACHE_DIR or ~/.cache/lora-gateway)."),
    ] = None,
) -> None:
    """Build the embedded tiny base and train the demo adapters (cached; idempotent)."""
    from adapters.artifacts import cache_dir as configured_cache_dir
    from adapters.demo import build_demo_adapters, demo_scores
    from adapters.tiny import TINY_NAME, build_tiny

    cache_dir = cache_dir or configured_cache_dir()
    base_dir = build_tiny(cache_dir)
    folders = build_demo_adapters(cache_dir, base_dir, TINY_NAME)
    for name, folder in folders.items():
        typer.echo(f"{name}: {folder}")
    typer.echo(json.dumps(demo_scores(cache_dir), indent=2))


@app.command(
    "train-bench",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def train_bench(ctx: typer.Context) -> None:
    """GPU training benchmark of `train` (Llama-3 shapes; `lora-gateway train-bench --help`, `... report`)."""
    from adapters.bench.cli import main

    raise typer.Exit(main(list(ctx.args)))
