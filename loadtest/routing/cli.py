"""``lora-gateway loadtest routing``: affinity routing vs round-robin over vLLM replicas it starts.

lora-gateway loadtest routing --replicas 2 --random-adapters 8 --resident 2 --out out/routing
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from loadtest.harness.options import (
    AdaptersOpt,
    BaseOpt,
    ConcOpt,
    RandomOpt,
    VerifyOpt,
    VllmArgOpt,
    base_and_adapters,
    ints,
)


def run_routing_command(**kw: Any) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from loadtest.routing.run import RoutingConfig, run_routing

    try:
        cfg = RoutingConfig(**kw)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def progress(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=done, visible=done < total)

    with bar:
        payload = run_routing(
            cfg, log=lambda line: bar.console.print(line, soft_wrap=True), progress=progress
        )
    t = payload["summary"]["totals"]
    for p in ("affinity", "round_robin"):
        console.print(f"{p}: {t[p]['adapter_loads']} loads, {t[p]['loads_per_1000_requests']:.1f} per 1000")
    ratio = t["loads_ratio_affinity_vs_round_robin"]
    console.print(f"loads, affinity / round-robin: {'-' if ratio is None else f'{ratio:.2f}x'}")
    console.print(f"wrote {cfg.out}/report.md, results.json and plots")
    return payload


def routing(
    base: BaseOpt = "tiny",
    adapters: AdaptersOpt = None,
    random_adapters: RandomOpt = None,
    replicas: Annotated[int, typer.Option(min=2, help="vLLM replicas started (all on this machine).")] = 2,
    resident: Annotated[
        int, typer.Option(min=1, help="Adapter slots per replica (registry.max_resident, vLLM max_loras).")
    ] = 2,
    out: Annotated[Path, typer.Option(help="Directory for results.json, report.md and plots.")] = Path(
        "out/routing"
    ),
    mix: Annotated[str, typer.Option(help="How requests draw adapters: uniform or zipf:S.")] = "zipf:1.1",
    concurrency: ConcOpt = "1,4,8",
    requests: Annotated[int, typer.Option(min=1, help="Requests per level and policy.")] = 200,
    prompt_tokens: Annotated[int, typer.Option(min=1)] = 64,
    max_tokens: Annotated[int, typer.Option(min=1)] = 32,
    vllm_arg: VllmArgOpt = None,
    workdir: Annotated[Path | None, typer.Option(help="Keep servers' logs and files here [temp].")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    timeout: Annotated[float, typer.Option(min=0.001, help="Per-request timeout (s).")] = 300.0,
    verify: VerifyOpt = False,
) -> None:
    """Affinity routing vs round-robin over the same vLLM replicas and request sequence: adapter loads
    per 1000 requests, TTFT, throughput (default: 8 random adapters over 2 replicas x 2 slots)."""
    if adapters is None and random_adapters is None:
        random_adapters = 8
    base_dir, base_name, paths = base_and_adapters(base, adapters, random_adapters, workdir)
    run_routing_command(
        base=base_dir,
        base_name=base_name,
        snapshot_base=base == "tiny",
        adapters=paths,
        out=out,
        replicas=replicas,
        resident=resident,
        mix=mix,
        concurrency=ints(concurrency, "--concurrency"),
        requests=requests,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        vllm_args=vllm_arg or [],
        workdir=workdir,
        seed=seed,
        timeout_s=timeout,
        verify=verify,
    )
