"""What a proxy adds: the same workload sent directly to an upstream and through the gateway.

For each offered rate R (open loop, Poisson) and each mode (non-streaming, streaming), the
requests go to both paths interleaved in one stream of arrivals at 2R req/s: request i is sent
once directly and once through the gateway, each path receiving R req/s, with the order inside
each pair alternating. Both paths share the generator, the machine and the moment, so their
difference is what the gateway adds:

- non-streaming: end-to-end latency
- streaming: time to first byte (first SSE event) and the inter-chunk gap (ITL)

reported as ``gateway - direct`` for mean, p50, p90 and p99 (milliseconds).

A level is *sustained* when the gateway path has p99 end-to-end latency under
``p99_target_ms``, at most ``max_error_rate`` failures, and every request was sent (the time
limit did not cut the schedule). ``max_sustained_rate`` is the highest sustained rate below
the first one that is not. A level that is not sustained names what limited it (``limited_by``): the
load generator when it could not send on schedule (send lag p99 over max(5 ms, target/10)),
the upstream or the machine when the direct path missed too, else the gateway. On a small
machine the generator shares the cores with what it measures, hence the aiohttp client by
default here (``client``; several times less CPU per request than httpx).

More proxies can be measured in the same run (``others``, e.g. LiteLLM's proxy in front of the
same upstream): each request is then sent once per path, the order rotating, at k x R req/s for
k paths; each proxy gets its own added latency and verdict under ``others``, and the sweep of a
mode stops once the proxy named by ``stop_when`` misses a rate.

    from loadtest.overhead.run import run_overhead
    from loadtest.overhead.report import write_overhead_report
    result = run_overhead("http://127.0.0.1:8001", "http://127.0.0.1:8000", [50, 200, 500], 10)
    write_overhead_report(Path("out/overhead"), result)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from loadtest.harness import stats
from loadtest.harness.machine import machine_info
from loadtest.harness.report import fmt, level_name
from loadtest.harness.runner import run_closed_loop, run_open_loop, run_sync
from loadtest.harness.senders import Job, Sender, jobs_for, make_sender
from loadtest.harness.workload import WorkloadSpec, generate

DEFAULT_RATES = (50, 200, 500, 1000, 1500, 2000, 3000)
MODES = ("nonstream", "stream")
ADDED_KEYS = ("e2e_ms", "ttfb_ms", "itl_ms")
STATS = ("mean", "p50", "p90", "p99")


def interleave(*paths: Sequence[Job]) -> list[Job]:
    """The same request on every path, the order rotating: with two paths, direct first in even
    pairs and gateway first in odd ones."""
    out: list[Job] = []
    k = len(paths)
    for i, group in enumerate(zip(*paths, strict=True)):
        r = i % k
        out += [*group[r:], *group[:r]] if k > 2 else (list(group) if r == 0 else list(group[::-1]))
    return out


def added_latency(direct: dict[str, Any], gateway: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``gateway - direct`` of each statistic, per metric (ms); None where either side is empty."""
    out: dict[str, dict[str, float | None]] = {}
    for key in ADDED_KEYS:
        d, g = direct[key], gateway[key]
        out[key] = {s: None if d[s] is None or g[s] is None else g[s] - d[s] for s in STATS}
    return out


def judge(side: dict[str, Any], p99_target_ms: float, max_error_rate: float) -> tuple[bool, str]:
    """Whether one path sustained its level, and why not."""
    req = side["requests"]
    if req["not_sent"]:
        return False, f"{req['not_sent']} requests not sent before the time limit"
    if req["sent"] and req["failed"] / req["sent"] > max_error_rate:
        return False, f"{req['failed']} of {req['sent']} failed"
    p99 = side["e2e_ms"]["p99"]
    if p99 is None or p99 >= p99_target_ms:
        return False, f"p99 e2e {fmt(p99)} ms >= {p99_target_ms:g} ms"
    return True, "ok"


def run_overhead(
    direct_url: str,
    gateway_url: str,
    rates: Sequence[float] = DEFAULT_RATES,
    duration_s: float = 10.0,
    *,
    model: str = "base",
    gateway_model: str | None = None,
    modes: Sequence[str] = MODES,
    prompt_tokens: int = 32,
    max_tokens: int = 16,
    p99_target_ms: float = 50.0,
    max_error_rate: float = 0.001,
    timeout_s: float = 10.0,
    warmup: int = 20,
    seed: int = 0,
    stop_on_saturation: bool = True,
    api_key: str | None = None,
    client: str = "aiohttp",
    on_level: Callable[[dict[str, Any]], None] | None = None,
    keep_records: bool = False,
    others: Mapping[str, tuple[str, str]] | None = None,
    stop_when: str = "gateway",
    ignore_eos: bool = False,
    extra_body: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure the gateway's added latency at each offered rate; returns a JSON-ready payload.

    ``others`` maps more proxies' tags to ``(url, model)``; ``stop_when`` is ``gateway`` or one
    of those tags. ``ignore_eos`` and ``extra_body`` go into every request (for a real vLLM:
    ``{"return_token_ids": True}`` makes a stream chunk per token, so the inter-chunk gap is the
    inter-token gap even where a random model's text comes out in bursts).

    With ``keep_records`` the payload also holds ``_records`` (per-request records by level),
    which :func:`write_overhead_report` writes to ``requests.jsonl`` and drops from the JSON.
    """
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes: choose from {MODES}, got {list(modes)}")
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"rates: must be > 0, got {list(rates)}")
    if duration_s <= 0:
        raise ValueError(f"duration_s: must be > 0, got {duration_s}")
    others = dict(others or {})
    if {"direct", "gateway"} & set(others):
        raise ValueError("others: the tags 'direct' and 'gateway' are taken")
    if stop_when != "gateway" and stop_when not in others:
        raise ValueError(f"stop_when: must be 'gateway' or one of {sorted(others)}, got {stop_when!r}")
    config = {
        "direct_url": direct_url,
        "gateway_url": gateway_url,
        "rates": list(rates),
        "duration_s": duration_s,
        "model": model,
        "gateway_model": gateway_model or model,
        "modes": list(modes),
        "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens,
        "p99_target_ms": p99_target_ms,
        "max_error_rate": max_error_rate,
        "timeout_s": timeout_s,
        "warmup": warmup,
        "seed": seed,
        "stop_on_saturation": stop_on_saturation,
        "client": client,
        "interleaving": "pairs of the same request, one per path, in alternating order"
        if not others
        else f"the same request on each of the {2 + len(others)} paths, in rotating order",
        "others": {tag: {"url": url, "model": m} for tag, (url, m) in others.items()},
        "ignore_eos": ignore_eos,
        "extra_body": dict(extra_body or {}),
        "stop_when": stop_when,
    }
    sender = make_sender(client, api_key=api_key, timeout_s=timeout_s, max_connections=2048)
    started = dt.datetime.now(dt.UTC)
    levels, records = run_sync(_run(config, sender, on_level))
    payload: dict[str, Any] = {
        "kind": "overhead",
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": config,
        "levels": levels,
        "max_sustained_rate": {m: max_sustained(levels, m) for m in modes},
    }
    if others:
        payload["others_max_sustained_rate"] = {
            tag: {m: max_sustained(levels, m, tag) for m in modes} for tag in others
        }
    if keep_records:
        payload["_records"] = records
    return payload


def max_sustained(levels: Sequence[dict[str, Any]], mode: str, proxy: str = "gateway") -> float | None:
    """Highest rate ``proxy`` sustained before the first one (in rate order) that it did not."""
    best = None
    for lv in sorted((lv for lv in levels if lv["mode"] == mode), key=lambda lv: lv["rate"]):
        verdict = lv if proxy == "gateway" else lv.get("others", {}).get(proxy)
        if verdict is None or not verdict["sustained"]:
            break
        best = lv["rate"]
    return best


async def _run(
    config: dict[str, Any], sender: Sender, on_level: Callable[[dict[str, Any]], None] | None
) -> tuple[list[dict[str, Any]], list[tuple[str, list[Any]]]]:
    levels: list[dict[str, Any]] = []
    records: list[tuple[str, list[Any]]] = []
    saturated: set[str] = set()
    timeout_s = config["timeout_s"]
    paths = [
        ("direct", config["direct_url"], config["model"]),
        ("gateway", config["gateway_url"], config["gateway_model"]),
        *((tag, o["url"], o["model"]) for tag, o in config["others"].items()),
    ]
    async with sender:
        for rate in config["rates"]:
            for mode in config["modes"]:
                if mode in saturated:
                    continue
                n = max(1, math.ceil(rate * config["duration_s"]))
                spec = WorkloadSpec(
                    models=[config["model"]],
                    prompt_tokens=config["prompt_tokens"],
                    max_tokens=config["max_tokens"],
                    stream=mode == "stream",
                    seed=config["seed"],
                    ignore_eos=config["ignore_eos"],
                    extra_body=config["extra_body"],
                )
                if config["warmup"]:
                    wjobs = _jobs(paths, spec, config["warmup"], spec.seed + 1_000_003)
                    await run_closed_loop(sender, wjobs, 4, time_limit_s=timeout_s, drain_s=0)
                jobs = _jobs(paths, spec, n, spec.seed)
                run = await run_open_loop(
                    sender,
                    jobs,
                    len(paths) * rate,
                    seed=config["seed"],
                    time_limit_s=config["duration_s"] * 1.5 + 1.0,
                    drain_s=timeout_s,
                )
                entry = _level_entry(rate, mode, run.records, n, run.duration_s, config)
                levels.append(entry)
                records.append((f"{level_name(rate)}/{mode}", run.records))
                if on_level is not None:
                    on_level(entry)
                watched = entry if config["stop_when"] == "gateway" else entry["others"][config["stop_when"]]
                if not watched["sustained"] and config["stop_on_saturation"]:
                    saturated.add(mode)
            if len(saturated) == len(config["modes"]):
                break
    return levels, records


def _jobs(paths: Sequence[tuple[str, str, str]], spec: WorkloadSpec, n: int, seed: int) -> list[Job]:
    """``n`` requests, each on every path (tag, url, model), interleaved."""
    per_path = []
    for tag, url, model in paths:
        specs = generate(dataclasses.replace(spec, models=[model], seed=seed), n)
        per_path.append(jobs_for(url, specs, tag))
    return interleave(*per_path)


def _verdict(
    side: dict[str, Any], direct_ok: bool, lag_p99: float | None, config: dict[str, Any]
) -> dict[str, Any]:
    ok, why = judge(side, config["p99_target_ms"], config["max_error_rate"])
    limited_by = None
    if not ok:
        if lag_p99 is not None and lag_p99 > max(5.0, config["p99_target_ms"] / 10):
            limited_by = f"load generator (send lag p99 {lag_p99:.1f} ms)"
        elif direct_ok:
            limited_by = "the proxy"
        else:
            limited_by = "upstream or machine (the direct path missed too)"
    return {"sustained": ok, "reason": why, "limited_by": limited_by}


def _level_entry(
    rate: float, mode: str, recs: list[Any], n: int, duration_s: float, config: dict[str, Any]
) -> dict[str, Any]:
    groups = stats.by_tag(recs)
    tags = ["direct", "gateway", *config["others"]]
    side = {tag: stats.summarize(groups.get(tag, []), duration_s=duration_s, requested=n) for tag in tags}
    direct_ok, _ = judge(side["direct"], config["p99_target_ms"], config["max_error_rate"])
    lag_p99 = stats.distribution((lag for r in recs if (lag := r.send_lag) is not None), 1000.0)["p99"]
    gateway = _verdict(side["gateway"], direct_ok, lag_p99, config)
    if gateway["limited_by"] == "the proxy":
        gateway["limited_by"] = "gateway"
    entry = {
        "rate": rate,
        "mode": mode,
        "direct": side["direct"],
        "gateway": side["gateway"],
        "added_ms": added_latency(side["direct"], side["gateway"]),
        **gateway,
        "send_lag_p99_ms": lag_p99,
    }
    if config["others"]:
        entry["others"] = {
            tag: {
                "summary": side[tag],
                "added_ms": added_latency(side["direct"], side[tag]),
                **_verdict(side[tag], direct_ok, lag_p99, config),
            }
            for tag in config["others"]
        }
    return entry
