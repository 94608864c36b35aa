"""One measured level of a scenario on its own servers (compare, thrash, routing): closed loop, streaming,
a chunk per token, at one concurrency, with the gateway's adapter loads and evictions read around it.

    before = adapter_counters(gateway.url)
    entry, records = closed_level(cfg, gateway.url, stream_workload(cfg, cfg.names), 4, cfg.requests)
    entry.update(counted(before, adapter_counters(gateway.url)))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from loadtest.harness.records import RequestResult
from loadtest.harness.scenario import ScenarioConfig
from loadtest.harness.sweep import SweepConfig, run_sweep
from loadtest.harness.verify import References
from loadtest.harness.workload import WorkloadSpec
from loadtest.servers.processes import scrape_counters

LOADS = 'lora_gateway_adapter_loads_total{result="ok"}'
LOAD_ERRORS = 'lora_gateway_adapter_loads_total{result="error"}'
EVICTIONS = "lora_gateway_adapter_evictions_total"
COUNTERS = {"adapter_loads": LOADS, "adapter_load_errors": LOAD_ERRORS, "adapter_evictions": EVICTIONS}


def stream_workload(cfg: ScenarioConfig, models: Sequence[str], seed: int | None = None) -> WorkloadSpec:
    """The scenario's requests to ``models`` (drawn under its mix when more than one): streaming, and a
    chunk per token (vLLM's ``return_token_ids``), so TTFT and TPOT count tokens, not characters."""
    return WorkloadSpec(
        models=list(models),
        mix=cfg.mix if len(models) > 1 else "uniform",
        prompt_tokens=cfg.prompt_tokens,
        max_tokens=cfg.max_tokens,
        stream=True,
        seed=cfg.seed if seed is None else seed,
        ignore_eos=cfg.ignore_eos,
        extra_body={"return_token_ids": True},
    )


def closed_level(
    cfg: ScenarioConfig,
    url: str,
    workload: WorkloadSpec,
    level: int,
    requests: int,
    *,
    references: References | None = None,
    on_done: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], list[RequestResult]]:
    """One closed-loop level against ``url``: its ``results.json`` entry and its records.

    With ``references`` (and ``cfg.verify``) every answer is checked against them, and they learn the
    requests they lack; ``on_done(n)`` is called after each finished request.
    """
    sweep = SweepConfig(
        target=url,
        workload=workload,
        mode="concurrency",
        levels=[level],
        requests=requests,
        timeout_s=cfg.timeout_s,
        time_limit_s=cfg.time_limit_s,
        client=cfg.client,
        verify=cfg.verify and references is not None,
    )
    done = [0]

    def tick(_: Any) -> None:
        done[0] += 1
        if on_done is not None:
            on_done(done[0])

    result = run_sweep(sweep, on_result=tick, references=references)
    return result.payload["levels"][0], result.records[0][1]


def adapter_counters(url: str) -> dict[str, float]:
    """The gateway's adapter load, load-error and eviction counters now (its ``/metrics``)."""
    return scrape_counters(url, list(COUNTERS.values()))


def counted(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """What the counters counted between two readings: ``adapter_loads``, ``adapter_load_errors``,
    ``adapter_evictions``."""
    return {key: int(after[name] - before[name]) for key, name in COUNTERS.items()}


def fmt_ms(x: float | None) -> str:
    """A latency for a progress line: one decimal, "-" when there is none."""
    return "-" if x is None else f"{x:.1f}"
