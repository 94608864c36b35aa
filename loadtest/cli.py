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
    lora-gateway loadtest benchmark --out docs/benchmarks      # everything in docs/benchmarks.md
    lora-gateway loadtest fast-upstream --port 8001

Mounted by the gateway CLI with ``app.add_typer(loadtest_app, name="loadtest")``; also runnable as
``python -m loadtest.cli``. Importing this module is cheap: the work is imported inside commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="loadtest",
    help="Load tests against any OpenAI-compatible endpoint: throughput, TTFT, TPOT, ITL, latency.",
    no_args_is_help=True,
    add_completion=False,
)


def _floats(text: str, option: str) -> list[float]:
    """Comma-separated positive numbers; whole numbers come back as ints (levels read as 1, not 1.0)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated numbers, got {text!r}", param_hint=option
        ) from None
    if not values or any(v <= 0 for v in values):
        raise typer.BadParameter(f"expected positive numbers, got {text!r}", param_hint=option)
    return [int(v) if v.is_integer() else v for v in values]


def _ms(d: dict[str, Any], stat: str) -> str:
    v = d.get(stat)
    return "-" if v is None else f"{v:.2f}"


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
        parts.append(f"TTFT p50/p99 {_ms(s['ttft_ms'], 'p50')}/{_ms(s['ttft_ms'], 'p99')} ms")
        parts.append(f"TPOT p50 {_ms(s['tpot_ms'], 'p50')} ms")
    parts.append(f"E2E p50/p99 {_ms(s['e2e_ms'], 'p50')}/{_ms(s['e2e_ms'], 'p99')} ms")
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
        _floats(rate, "--rate") if rate is not None else _floats(concurrency or "1,4,16,64", "--concurrency")
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


@app.command()
def overhead(
    direct: Annotated[
        str | None, typer.Option(help="Base URL of an upstream you run, reached directly.")
    ] = None,
    gateway: Annotated[str | None, typer.Option(help="Base URL of a gateway you run in front of it.")] = None,
    rates: Annotated[str, typer.Option(help="Offered rates per path (req/s), in order.")] = (
        "50,200,500,1000,1500,2000,3000"
    ),
    duration: Annotated[float, typer.Option(min=0.1, help="Seconds per rate and mode.")] = 10.0,
    out: Annotated[Path, typer.Option(help="Directory for results.json, report.md and plots.")] = Path(
        "out/overhead"
    ),
    model: Annotated[str, typer.Option(help="Model name sent directly.")] = "base",
    gateway_model: Annotated[
        str | None, typer.Option(help="Model name through the gateway [= --model].")
    ] = None,
    modes: Annotated[str, typer.Option(help="nonstream, stream or both.")] = "nonstream,stream",
    prompt_tokens: Annotated[int, typer.Option(min=1)] = 32,
    max_tokens: Annotated[int, typer.Option(min=1)] = 16,
    p99_target_ms: Annotated[float, typer.Option(help="Sustained means gateway p99 e2e under this.")] = 50.0,
    timeout: Annotated[float, typer.Option(min=0.001, help="Per-request timeout (s).")] = 10.0,
    seed: Annotated[int, typer.Option()] = 0,
    api_key: Annotated[str | None, typer.Option(help="Sent to both paths as a Bearer token.")] = None,
    stop_on_saturation: Annotated[bool, typer.Option(help="Skip higher rates once one is missed.")] = True,
    client: Annotated[str, typer.Option(help="HTTP client: aiohttp (light) or httpx.")] = "aiohttp",
    vllm: Annotated[
        bool, typer.Option(help="Self-managed: also measure in front of the real vLLM (tiny model).")
    ] = True,
    vllm_rates: Annotated[str, typer.Option(help="Self-managed: offered rates against vLLM.")] = "2,5,10,20",
    litellm: Annotated[
        bool,
        typer.Option(help="Self-managed: also LiteLLM's proxy, in its own venv (.cache/litellm-venv)."),
    ] = False,
    litellm_rates: Annotated[
        str, typer.Option(help="Self-managed: rates with LiteLLM.")
    ] = "10,20,50,100,200",
    closed_loop: Annotated[
        str, typer.Option(help="Self-managed: closed-loop concurrency levels, each path alone.")
    ] = "1,8,32",
    closed_requests: Annotated[int, typer.Option(min=1, help="Self-managed: requests per level.")] = 2000,
    paced_itl_ms: Annotated[
        float, typer.Option(min=0, help="Self-managed: streams paced this far apart (ms), 0: skip that part.")
    ] = 5.0,
    other: Annotated[
        list[str] | None,
        typer.Option(help="With --direct/--gateway: another proxy in the same run, TAG=URL (repeatable)."),
    ] = None,
) -> None:
    """Added latency of the gateway over a direct upstream at fixed offered rates (open loop).

    With --direct and --gateway, measures those. With neither, starts its own: the fast upstream
    and a gateway attached to it (each in its own process), LiteLLM with --litellm, and a managed
    gateway over the real vLLM unless --no-vllm; then stops them.
    """
    if (direct is None) != (gateway is None):
        raise typer.BadParameter("give both --direct and --gateway, or neither", param_hint="--gateway")
    if direct is None:
        from loadtest.overhead.suite import SuiteConfig, run_suite

        cfg = SuiteConfig(
            out=out,
            rates=_floats(rates, "--rates"),
            duration_s=duration,
            modes=[m.strip() for m in modes.split(",") if m.strip()],
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            p99_target_ms=p99_target_ms,
            closed_loop=[int(c) for c in _floats(closed_loop, "--closed-loop")],
            closed_requests=closed_requests,
            paced_itl_ms=paced_itl_ms,
            vllm=vllm,
            vllm_rates=_floats(vllm_rates, "--vllm-rates"),
            vllm_duration_s=duration,
            litellm=litellm,
            litellm_rates=_floats(litellm_rates, "--litellm-rates"),
            client=client,
            seed=seed,
        )
        payload = run_suite(cfg, log=lambda line: typer.echo(line, err=True))
        from loadtest.overhead.suite_report import target_rows

        for target, measured, verdict in target_rows(payload["targets"]):
            typer.echo(f"{target}: {measured} ({verdict})", err=True)
        typer.echo(f"wrote {out}/report.md and {', '.join(payload['parts'].values())}", err=True)
        return

    from loadtest.overhead.report import write_overhead_report
    from loadtest.overhead.run import run_overhead

    others = {}
    for item in other or []:
        tag, sep, url = item.partition("=")
        if not sep or not tag or not url:
            raise typer.BadParameter(f"expected TAG=URL, got {item!r}", param_hint="--other")
        others[tag] = (url, gateway_model or model)

    def show(lv: dict[str, Any]) -> None:
        added = lv["added_ms"]
        key = "e2e_ms" if lv["mode"] == "nonstream" else "ttfb_ms"
        g = lv["gateway"]
        typer.echo(
            f"rate={lv['rate']:g} {lv['mode']}: gateway {g['request_throughput']:.0f} req/s, "
            f"{key[:-3]} p50 {_ms(g[key], 'p50')} ms p99 {_ms(g[key], 'p99')} ms, "
            f"added p50 {_ms(added[key], 'p50')} ms p99 {_ms(added[key], 'p99')} ms, "
            f"{'sustained' if lv['sustained'] else 'NOT sustained: ' + lv['reason']}"
            + "".join(
                f"; {tag} added p50 {_ms(a, 'p50')} ms p99 {_ms(a, 'p99')} ms"
                for tag, o in lv.get("others", {}).items()
                if (a := o["added_ms"][key])
            ),
            err=True,
        )

    try:
        payload = run_overhead(
            direct,
            gateway,  # type: ignore[arg-type]  # both given (checked above)
            _floats(rates, "--rates"),
            duration,
            model=model,
            gateway_model=gateway_model,
            modes=[m.strip() for m in modes.split(",") if m.strip()],
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            p99_target_ms=p99_target_ms,
            timeout_s=timeout,
            seed=seed,
            stop_on_saturation=stop_on_saturation,
            api_key=api_key,
            client=client,
            on_level=show,
            keep_records=True,
            others=others,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    files = write_overhead_report(out, payload)
    typer.echo(f"max sustained rate: {payload['max_sustained_rate']}", err=True)
    typer.echo(f"wrote {', '.join(str(p) for p in files.values())}", err=True)


@app.command("fast-upstream")
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


from loadtest.compare.cli import benchmark, compare, routing, thrash  # noqa: E402 - registered last

app.command()(compare)
app.command()(thrash)
app.command()(routing)
app.command()(benchmark)

if __name__ == "__main__":
    app()
