"""``lora-gateway loadtest chaos``: clients keep sending while vLLM is killed with SIGKILL once.

lora-gateway loadtest chaos --clients 24 --duration 60 --replicas 1 --out out/chaos-1
lora-gateway loadtest chaos --clients 24 --duration 60 --replicas 2 --out out/chaos-2
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def chaos(
    clients: Annotated[
        int, typer.Option(min=1, help="Concurrent clients (base and adapters, half streamed).")
    ] = 24,
    duration: Annotated[
        float, typer.Option(min=1, help="Clients run at least this long (s), and until the engine is back.")
    ] = 60.0,
    replicas: Annotated[int, typer.Option(min=1, max=2, help="vLLM replicas; one of them is killed.")] = 1,
    kill_at: Annotated[
        float | None, typer.Option(help="When the SIGKILL goes (s) (default: a quarter of duration).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer (greedy, ignore_eos).")] = 8,
    out: Annotated[Path, typer.Option(help="Directory for results.json, report.md and chaos.png.")] = Path(
        "out/chaos"
    ),
    workdir: Annotated[
        Path | None, typer.Option(help="Keep the gateway's logs and data here (default: a temp folder).")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Kill vLLM (or one of two replicas) once with SIGKILL under load: failures, their shape, lost
    requests, wrong answers, time until served again, drift after the restart."""
    from loadtest.chaos.run import ChaosConfig, run_chaos

    try:
        cfg = ChaosConfig(
            out=out,
            clients=clients,
            duration_s=duration,
            replicas=replicas,
            kill_at_s=duration / 4 if kill_at is None else kill_at,
            max_tokens=max_tokens,
            workdir=workdir,
            seed=seed,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    say = lambda line: typer.echo(line, err=True)  # noqa: E731
    s = run_chaos(cfg, log=say)["summary"]
    say(
        f"{s['requests_sent']} sent, {s['right']} right (+{s['near_ties']} near ties), {s['wrong']} wrong, "
        f"{s['failed']} failed ({s['failed_not_openai_shaped']} not OpenAI-shaped), "
        f"{s['unstarted_lost']} unstarted lost, 503s {s['responses_503']} "
        f"({s['responses_503_with_retry_after']} with Retry-After), served again after "
        f"{s['seconds_until_served_again']} s, drift {s['drift']}"
    )
    say(f"wrote {out}/results.json, report.md, chaos.png")
