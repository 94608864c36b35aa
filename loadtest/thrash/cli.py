"""``lora-gateway loadtest thrash``: more adapters than the gateway (and vLLM) keep loaded, under the mix:
compare's run with only the all-resident and thrash modes.

    lora-gateway loadtest thrash --base tiny --random-adapters 16 --resident 8 --out out/thrash
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loadtest.compare.cli import run_compare_command
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


def thrash(
    base: BaseOpt = "tiny",
    adapters: AdaptersOpt = None,
    random_adapters: RandomOpt = None,
    out: Annotated[Path, typer.Option(help="Directory for results.json, report.md and plots.")] = Path(
        "out/thrash"
    ),
    resident: Annotated[
        int | None, typer.Option(help="registry.max_resident (and engine slots) [= half the adapters].")
    ] = None,
    engine_thrash: EngineThrashOpt = True,
    repeat: RepeatOpt = 1,
    mix: Annotated[str, typer.Option(help="uniform or zipf:S.")] = "zipf:1.1",
    concurrency: ConcOpt = "1,4,16",
    requests: Annotated[int, typer.Option(min=1, help="Requests per level and mode.")] = 64,
    prompt_tokens: Annotated[int, typer.Option(min=1)] = 64,
    max_tokens: Annotated[int, typer.Option(min=1)] = 32,
    vllm_arg: VllmArgOpt = None,
    workdir: Annotated[Path | None, typer.Option(help="Keep servers' logs and files here [temp].")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    verify: VerifyOpt = False,
) -> None:
    """More adapters than the gateway keeps loaded (and than vLLM keeps), under the mix: TTFT p99 and
    loads vs all resident."""
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
        thrash=True,
        thrash_resident=resident,
        engine_thrash=engine_thrash,
        repeat=repeat,
        merged=False,
        single=False,
        vllm_args=vllm_arg or [],
        workdir=workdir,
        seed=seed,
        verify=verify,
    )
