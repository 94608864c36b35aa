"""``loadtest compare``, ``loadtest thrash`` and ``loadtest benchmark``: the commands that start their
own vLLM servers and gateways (registered on the app by ``loadtest.cli``).

    lora-gateway loadtest compare --base tiny --random-adapters 16 --thrash --out out/compare
    lora-gateway loadtest compare --base /models/llama --adapters /a/sql,/a/chat --out out/compare
    lora-gateway loadtest thrash --base tiny --random-adapters 16 --resident 8 --out out/thrash
    lora-gateway loadtest routing --replicas 2 --random-adapters 8 --resident 2 --out out/routing
    lora-gateway loadtest benchmark --out docs/benchmarks      # everything in docs/benchmarks.md
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint=option
        ) from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"expected integers >= 1, got {text!r}", param_hint=option)
    return values


def _adapters(
    base: str, adapters: str | None, random_adapters: int | None, workdir: Path | None
) -> tuple[Path, str, list[Path]]:
    """The base folder, its served name and the adapter folders (``tiny``: the embedded base)."""
    from gateway.settings import Settings

    cache = Settings().cache_dir
    if base == "tiny":
        from adapters.tiny import TINY_NAME, build_tiny

        base_dir, base_name = build_tiny(cache), TINY_NAME
    else:
        base_dir = Path(base).expanduser().absolute()
        if not (base_dir / "config.json").is_file():
            raise typer.BadParameter(f"not a model folder (no config.json): {base}", param_hint="--base")
        base_name = base_dir.name
    if (adapters is None) == (random_adapters is None):
        raise typer.BadParameter("give --adapters or --random-adapters", param_hint="--adapters")
    if adapters is not None:
        paths = [Path(a.strip()).expanduser().absolute() for a in adapters.split(",") if a.strip()]
        for a in paths:
            if not (a / "adapter_config.json").is_file():
                raise typer.BadParameter(f"not a PEFT folder: {a}", param_hint="--adapters")
        return base_dir, base_name, paths
    from loadtest.harness.scenario import random_adapters as make

    where = (workdir or cache / "loadtest-adapters") / f"random-for-{base_name}"
    return base_dir, base_name, make(base_dir, base_name, int(random_adapters or 0), where)


BaseOpt = Annotated[str, typer.Option(help="Base model folder, or 'tiny' for the embedded one.")]
AdaptersOpt = Annotated[str | None, typer.Option(help="Comma-separated PEFT adapter folders.")]
RandomOpt = Annotated[
    int | None,
    typer.Option(min=1, help="Instead of --adapters: N random adapters for the base (adapters/demo.py)."),
]
ConcOpt = Annotated[str, typer.Option(help="Closed-loop concurrency levels.")]
EngineThrashOpt = Annotated[
    bool,
    typer.Option(
        help="Also the same adapters over a vLLM that keeps only thrash-resident of them (--max-loras and "
        "--max-cpu-loras), all registered: vLLM swaps them through its slots and reads evicted ones back "
        "from disk itself (starts one more vLLM)."
    ),
]
RepeatOpt = Annotated[
    int,
    typer.Option(min=1, help="Measure each level this many times and pool the requests (p99 over all)."),
]
VllmArgOpt = Annotated[
    list[str] | None, typer.Option(help="Extra vLLM argument, repeatable (--vllm-arg=--dtype=bfloat16).")
]


VerifyOpt = Annotated[
    bool,
    typer.Option(
        help="Check every answer against its model's own answer to that request sent alone to the same "
        "server (greedy): wrong answers per level, mode and model in results.json and report.md."
    ),
]


def _compare(**kw: Any) -> None:
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
) -> None:
    """Merged serving vs adapter-only serving (1 adapter, all under the mix), on servers it starts itself."""
    base_dir, base_name, paths = _adapters(base, adapters, random_adapters, workdir)
    _compare(
        base=base_dir,
        base_name=base_name,
        snapshot_base=base == "tiny",
        adapters=paths,
        out=out,
        mix=mix,
        concurrency=_ints(concurrency, "--concurrency"),
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
    base_dir, base_name, paths = _adapters(base, adapters, random_adapters, workdir)
    _compare(
        base=base_dir,
        base_name=base_name,
        snapshot_base=base == "tiny",
        adapters=paths,
        out=out,
        mix=mix,
        concurrency=_ints(concurrency, "--concurrency"),
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


def _routing(**kw: Any) -> dict[str, Any]:
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
    base_dir, base_name, paths = _adapters(base, adapters, random_adapters, workdir)
    _routing(
        base=base_dir,
        base_name=base_name,
        snapshot_base=base == "tiny",
        adapters=paths,
        out=out,
        replicas=replicas,
        resident=resident,
        mix=mix,
        concurrency=_ints(concurrency, "--concurrency"),
        requests=requests,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        vllm_args=vllm_arg or [],
        workdir=workdir,
        seed=seed,
        timeout_s=timeout,
        verify=verify,
    )


def benchmark(
    out: Annotated[Path, typer.Option(help="Where the reports go.")] = Path("docs/benchmarks"),
    litellm: Annotated[bool, typer.Option(help="Include LiteLLM's proxy (installs it in .cache/).")] = True,
    adapters: Annotated[int, typer.Option(min=2, help="Random adapters for compare and thrash.")] = 16,
    requests: Annotated[int, typer.Option(min=1, help="compare: requests per level and mode.")] = 200,
    repeat: Annotated[int, typer.Option(min=1, help="compare: runs per level and mode, pooled.")] = 3,
) -> None:
    """The full benchmark of docs/benchmarks.md: overhead (fast upstream, LiteLLM, real vLLM), then
    compare (merged vs adapter-only, 16 random adapters under zipf:1.1) with both thrash scenarios, each
    level measured 3 times, then
    routing (affinity vs round-robin over 2 replicas, 8 random adapters, 2 slots per replica)."""
    from loadtest.overhead.suite import SuiteConfig, run_suite
    from loadtest.overhead.suite_report import target_rows

    say = lambda line: typer.echo(line, err=True)  # noqa: E731
    payload = run_suite(SuiteConfig(out=out / "overhead", litellm=litellm), log=say)
    for target, measured, verdict in target_rows(payload["targets"]):
        say(f"{target}: {measured} ({verdict})")
    base_dir, base_name, paths = _adapters("tiny", None, adapters, None)
    _compare(
        base=base_dir,
        base_name=base_name,
        snapshot_base=True,
        adapters=paths,
        out=out / "compare",
        concurrency=[1, 4, 16, 64],
        requests=requests,
        thrash=True,
        engine_thrash=True,
        repeat=repeat,
        verify=True,  # a benchmark that does not check its answers can hide wrong output
    )
    base_dir, base_name, paths = _adapters("tiny", None, 8, None)
    _routing(
        base=base_dir,
        base_name=base_name,
        snapshot_base=True,
        adapters=paths,
        out=out / "routing",
        requests=requests,
    )
