"""``lora-gateway loadtest overhead``: what the gateway adds, on servers you run or on its own.

    lora-gateway loadtest overhead --direct http://127.0.0.1:8001 --gateway http://127.0.0.1:8000 \\
        --rates 50,200,500,1000 --duration 10 --out out/overhead
    lora-gateway loadtest overhead --out out/overhead [--litellm] [--no-vllm]   # starts its own servers
    lora-gateway loadtest overhead --relay-cpu --streams 16,64,128,256 --workers 1,2 --out out/relay-cpu
        # gateway CPU per relayed chunk and added inter-token latency, paced streams (relay_cpu.py)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from loadtest.harness.options import floats, ms


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
    relay_cpu: Annotated[
        bool,
        typer.Option(
            help="Only the relay's cost with paced streams: gateway CPU per chunk (from /proc) and added ITL "
            "p99, per concurrency, direct and through each relay (loadtest/overhead/relay_cpu.py)."
        ),
    ] = False,
    streams: Annotated[str, typer.Option(help="--relay-cpu: concurrent streams per level.")] = "16,64,128",
    chunks: Annotated[int, typer.Option(min=2, help="--relay-cpu: chunks per stream.")] = 200,
    itl_ms: Annotated[float, typer.Option(min=0, help="--relay-cpu: ms between chunks.")] = 10.0,
    rounds: Annotated[int, typer.Option(min=1, help="--relay-cpu: interleaved rounds.")] = 2,
    workers: Annotated[str, typer.Option(help="--relay-cpu: also serve --workers N for N > 1.")] = "1",
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
    if relay_cpu:
        from loadtest.overhead.relay_cpu import run as run_relay_cpu

        payload = run_relay_cpu(
            out,
            streams=[int(x) for x in floats(streams, "--streams")],
            chunks=chunks,
            itl_ms=itl_ms,
            duration_s=duration,
            rounds=rounds,
            workers=[int(x) for x in floats(workers, "--workers")],
            log=lambda line: typer.echo(line, err=True),
        )
        for path, best in payload["summary"]["within_itl_budget"].items():
            typer.echo(
                f"{path}: {best['events_per_s']:.0f} chunks/s at {best['streams']} streams, added ITL "
                f"p99 {best['added_itl_p99_ms']:.2f} ms, {best['cpu_us_per_event']:.1f} us CPU per chunk",
                err=True,
            )
        typer.echo(f"wrote {out}/results.json and {out}/relay_cpu.png", err=True)
        return
    if (direct is None) != (gateway is None):
        raise typer.BadParameter("give both --direct and --gateway, or neither", param_hint="--gateway")
    if direct is None:
        from loadtest.overhead.suite import SuiteConfig, run_suite

        cfg = SuiteConfig(
            out=out,
            rates=floats(rates, "--rates"),
            duration_s=duration,
            modes=[m.strip() for m in modes.split(",") if m.strip()],
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            p99_target_ms=p99_target_ms,
            closed_loop=[int(c) for c in floats(closed_loop, "--closed-loop")],
            closed_requests=closed_requests,
            paced_itl_ms=paced_itl_ms,
            vllm=vllm,
            vllm_rates=floats(vllm_rates, "--vllm-rates"),
            vllm_duration_s=duration,
            litellm=litellm,
            litellm_rates=floats(litellm_rates, "--litellm-rates"),
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
            f"{key[:-3]} p50 {ms(g[key], 'p50')} ms p99 {ms(g[key], 'p99')} ms, "
            f"added p50 {ms(added[key], 'p50')} ms p99 {ms(added[key], 'p99')} ms, "
            f"{'sustained' if lv['sustained'] else 'NOT sustained: ' + lv['reason']}"
            + "".join(
                f"; {tag} added p50 {ms(a, 'p50')} ms p99 {ms(a, 'p99')} ms"
                for tag, o in lv.get("others", {}).items()
                if (a := o["added_ms"][key])
            ),
            err=True,
        )

    try:
        payload = run_overhead(
            direct,
            gateway,  # type: ignore[arg-type]  # both given (checked above)
            floats(rates, "--rates"),
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
