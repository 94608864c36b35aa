"""``lora-gateway loadtest ...``: drive any OpenAI-compatible endpoint and write a report.

    lora-gateway loadtest run --target http://127.0.0.1:8000 --models sql,chat --mix zipf:1.1 \\
        --concurrency 1,4,16,64 --requests 200 --prompt-tokens 128 --max-tokens 64 --stream --out out/run
    lora-gateway loadtest run --target http://127.0.0.1:8000 --models base --rate 1,2,4 --requests 100 \\
        --stream --out out/rate
    lora-gateway loadtest overhead --direct http://127.0.0.1:8001 --gateway http://127.0.0.1:8000 \\
        --rates 50,200,500,1000 --duration 10 --out out/overhead
    lora-gateway loadtest overhead --out out/overhead [--litellm] [--no-vllm]   # starts its own servers
    lora-gateway loadtest compare --base tiny --random-adapters 16 --thrash --out out/compare
    lora-gateway loadtest compare --base /models/llama --adapters /a/sql,/a/chat --out out/compare
    lora-gateway loadtest thrash --base tiny --random-adapters 16 --resident 8 --out out/thrash
    lora-gateway loadtest routing --replicas 2 --random-adapters 8 --resident 2 --out out/routing
    lora-gateway loadtest chaos --clients 24 --duration 60 --replicas 1 --out out/chaos
    lora-gateway loadtest scale --adapters 4,1000 --concurrency 1,8,32 --out out/scale   # many adapters
    lora-gateway loadtest benchmark --out docs/benchmarks      # everything in docs/benchmarks.md
    lora-gateway loadtest fast-upstream --port 8001

``run`` (the harness alone, against any endpoint), ``fast-upstream`` and ``benchmark`` (every scenario
in turn) are here; each scenario's command is in its package (``overhead.cli``, ``compare.cli``,
``thrash.cli``, ``routing.cli``, ``chaos.cli``), their shared options in ``harness.options``. Mounted by
the gateway CLI with ``app.add_typer(loadtest_app, name="loadtest")``; also runnable as
``python -m loadtest.cli``. Importing this module is cheap: the work is imported inside commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from loadtest.chaos.cli import chaos
from loadtest.compare.cli import compare, run_compare_command
from loadtest.harness.options import base_and_adapters, floats, ms
from loadtest.overhead.cli import overhead
from loadtest.routing.cli import routing, run_routing_command
from loadtest.thrash.cli import thrash

app = typer.Typer(
    name="loadtest",
    help="Load tests against any OpenAI-compatible endpoint: throughput, TTFT, TPOT, ITL, latency.",
    no_args_is_help=True,
    add_completion=False,
)


def _level_line(mode: str, entry: dict[str, Any]) -> str:
    from loadtest.harness.report import level_name

    s = entry["summary"]
    r = s["requests"]
    parts = [
        f"{mode}={level_name(entry['level'])}:",
        f"{r['completed']} ok, {r['failed']} failed"
        + (f", {r['not_sent']} not sent" if r["not_sent"] else ""),
        f"{s['request_throughput']:.2f} req/s, {s['output_token_throughput']:.1f} tok/s",
    ]
    if s["ttft_ms"]["count"]:
        parts.append(f"TTFT p50/p99 {ms(s['ttft_ms'], 'p50')}/{ms(s['ttft_ms'], 'p99')} ms")
        parts.append(f"TPOT p50 {ms(s['tpot_ms'], 'p50')} ms")
    parts.append(f"E2E p50/p99 {ms(s['e2e_ms'], 'p50')}/{ms(s['e2e_ms'], 'p99')} ms")
    if s["errors"]:
        parts.append("errors " + ", ".join(f"{k}: {v}" for k, v in s["errors"].items()))
    return "  ".join(parts)


def verify_line(v: dict[str, Any]) -> str:
    """``--verify``'s one-line verdict: answers checked, wrong, and whose answers the wrong ones were."""
    line = f"{v['checked']} answers checked, {v['wrong']} wrong, {v['near_ties']} near ties"
    if v["wrong"]:
        line += f" ({v['wrong_model']} another model's answer)"
        line += "; " + ", ".join(
            f"{m}: {c['wrong']}" + (f" (as {dict(c['as_model'])})" if c["as_model"] else "")
            for m, c in v["per_model"].items()
            if c["wrong"]
        )
    return line


@app.command()
def run(
    target: Annotated[str, typer.Option(help="Base URL of the endpoint, e.g. http://127.0.0.1:8000")],
    models: Annotated[str, typer.Option(help="Comma-separated model names to send to.")],
    mix: Annotated[str, typer.Option(help="How models are drawn: uniform or zipf:S.")] = "uniform",
    concurrency: Annotated[
        str | None,
        typer.Option(help="Closed loop: comma-separated in-flight levels (1,4,16,64 without --rate)."),
    ] = None,
    rate: Annotated[
        str | None, typer.Option(help="Open loop: comma-separated offered rates (req/s, Poisson).")
    ] = None,
    requests: Annotated[int, typer.Option(min=1, help="Requests per level.")] = 100,
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt length, about this many tokens.")] = 128,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens of each request.")] = 64,
    stream: Annotated[bool, typer.Option(help="Stream (needed for TTFT, TPOT, ITL).")] = False,
    out: Annotated[Path, typer.Option(help="Directory for results.json, report.md and plots.")] = Path(
        "out/loadtest"
    ),
    api_key: Annotated[str | None, typer.Option(help="Sent as 'Authorization: Bearer KEY'.")] = None,
    timeout: Annotated[float, typer.Option(min=0.001, help="Per-request timeout (s).")] = 60.0,
    time_limit: Annotated[
        float, typer.Option(min=0.001, help="Sending stops after this (s), per level.")
    ] = 600.0,
    seed: Annotated[int, typer.Option(help="Seed of prompts, model draws and arrivals.")] = 0,
    endpoint: Annotated[str, typer.Option(help="chat (/v1/chat/completions) or completions.")] = "chat",
    ignore_eos: Annotated[
        bool, typer.Option(help="Send vLLM's ignore_eos so outputs are max_tokens long.")
    ] = False,
    token_ids: Annotated[
        bool, typer.Option(help="Send vLLM's return_token_ids: one stream chunk per token.")
    ] = False,
    warmup: Annotated[int, typer.Option(min=0, help="Unmeasured requests before each level.")] = 0,
    max_connections: Annotated[int | None, typer.Option(help="HTTP connection pool size.")] = None,
    client: Annotated[
        str, typer.Option(help="HTTP client: httpx, or aiohttp (less CPU per request).")
    ] = "httpx",
    verify: Annotated[
        bool,
        typer.Option(
            help="Check every answer against its model's own answer to that request sent alone "
            "(learned after the levels, one at a time; greedy): wrong answers per level and model."
        ),
    ] = False,
) -> None:
    """Drive an endpoint at each concurrency (closed loop) or rate (open loop) and write a report."""
    from loadtest.harness.report import write_run_report
    from loadtest.harness.sweep import SweepConfig, run_sweep
    from loadtest.harness.workload import WorkloadSpec

    if concurrency is not None and rate is not None:
        raise typer.BadParameter("give --concurrency or --rate, not both", param_hint="--rate")
    mode = "rate" if rate is not None else "concurrency"
    levels = (
        floats(rate, "--rate") if rate is not None else floats(concurrency or "1,4,16,64", "--concurrency")
    )
    try:
        workload = WorkloadSpec(
            models=[m.strip() for m in models.split(",") if m.strip()],
            mix=mix,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            stream=stream,
            endpoint=endpoint,  # type: ignore[arg-type]  # checked in WorkloadSpec
            seed=seed,
            ignore_eos=ignore_eos,
            extra_body={"return_token_ids": True} if token_ids else {},
        )
        cfg = SweepConfig(
            target=target,
            workload=workload,
            mode=mode,
            levels=levels,
            requests=requests,
            api_key=api_key,
            timeout_s=timeout,
            time_limit_s=time_limit,
            warmup=warmup,
            max_connections=max_connections,
            client=client,
            verify=verify,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    task: list[Any] = []

    def start(level: float, total: int) -> None:
        from loadtest.harness.report import level_name

        task[:] = [progress.add_task(f"{mode}={level_name(level)}", total=total)]

    def advance(_: Any) -> None:
        progress.advance(task[0])

    def end(entry: dict[str, Any]) -> None:
        progress.update(task[0], visible=False)
        progress.console.print(_level_line(mode, entry), soft_wrap=True)

    names = ",".join(str(x) for x in levels)
    console.print(f"{target}: {mode} {names}, {requests} requests per level", soft_wrap=True)
    with progress:
        result = run_sweep(cfg, on_level_start=start, on_result=advance, on_level_end=end)
    if verify:
        from loadtest.harness.report import level_name

        for entry in result.payload["levels"]:
            console.print(
                f"{mode}={level_name(entry['level'])}: {verify_line(entry['verify'])}", soft_wrap=True
            )
    files = write_run_report(out, result.payload, result.records)
    console.print(f"wrote {', '.join(str(p) for p in files.values())}", soft_wrap=True)


def fast_upstream(
    port: Annotated[int, typer.Option()] = 8001,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    strict_models: Annotated[bool, typer.Option(help="404 for unknown models, as vLLM does.")] = False,
    itl_ms: Annotated[float, typer.Option(help="Delay between tokens.")] = 0.0,
    ttft_ms: Annotated[float, typer.Option(help="Delay before the first token.")] = 0.0,
) -> None:
    """Serve the minimal fast OpenAI-compatible upstream (canned tokens, vLLM LoRA routes)."""
    from loadtest.servers.fast_upstream import main

    args = ["--host", host, "--port", str(port), "--itl-ms", str(itl_ms), "--ttft-ms", str(ttft_ms)]
    main(args + (["--strict-models"] if strict_models else []))


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
    base_dir, base_name, paths = base_and_adapters("tiny", None, adapters, None)
    run_compare_command(
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
    base_dir, base_name, paths = base_and_adapters("tiny", None, 8, None)
    run_routing_command(
        base=base_dir,
        base_name=base_name,
        snapshot_base=True,
        adapters=paths,
        out=out / "routing",
        requests=requests,
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def scale(ctx: typer.Context) -> None:
    """Many adapters on one base (loadtest/scale/run.py): the registry with 1,000 adapters, and vLLM's own
    benchmark through the gateway with N adapters against 4. Options: `python -m loadtest.scale.run -h`."""
    from loadtest.scale.run import main

    main(list(ctx.args))


# in the order of `lora-gateway loadtest --help`
app.command()(overhead)
app.command("fast-upstream")(fast_upstream)
app.command()(compare)
app.command()(thrash)
app.command()(routing)
app.command()(chaos)
app.command()(benchmark)

if __name__ == "__main__":
    app()
