"""``loadtest overhead --out DIR`` with nothing given: it starts what it measures, then stops it.

    fast upstream (its own process)  <-  gateway, attached (its own process, own data_dir)
                                     <-  LiteLLM's proxy, one worker (--litellm, its own venv)
    vLLM on the embedded tiny model  <-  gateway, managed (--vllm)

Parts, each written to its own folder under ``out`` by :mod:`loadtest.overhead.report`:

1. ``fast/``     open loop, direct vs gateway interleaved, at fixed offered rates upward until the
                 gateway misses p99 < 50 ms: added latency and the most req/s one process sustains
2. ``closed_loop`` (in ``results.json``) each path alone at fixed concurrency, with the CPU each
                 process spent per request: on a 2-core box the generator, the gateway and the
                 upstream share the cores, so these numbers measure CPU share, not proxy latency
3. ``litellm/``  direct vs gateway vs LiteLLM interleaved, until LiteLLM misses (``--litellm``)
4. ``vllm/``     direct vs gateway in front of the real vLLM (``--vllm``): added latency and the
                 streaming inter-chunk gap at rates the tiny model on the CPU can serve

The top-level ``results.json`` and ``report.md`` put the numbers next to the targets of issue 5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.harness import stats
from loadtest.harness.machine import machine_info
from loadtest.harness.runner import run_closed_loop, run_sync
from loadtest.harness.senders import jobs_for, make_sender
from loadtest.harness.workload import WorkloadSpec, generate
from loadtest.overhead.report import write_overhead_report
from loadtest.overhead.run import DEFAULT_RATES, MODES, run_overhead
from loadtest.servers import fast_upstream as upstream
from loadtest.servers.processes import Server, gateway_process, process
from loadtest.servers.serving import free_port

Log = Callable[[str], None]
TARGET_RATE = 200


@dataclass(frozen=True, slots=True)
class SuiteConfig:
    """What ``loadtest overhead --out DIR`` runs; every part is bounded in requests and time."""

    out: Path
    rates: Sequence[float] = DEFAULT_RATES
    duration_s: float = 10.0
    modes: Sequence[str] = MODES
    prompt_tokens: int = 32
    max_tokens: int = 16
    p99_target_ms: float = 50.0
    closed_loop: Sequence[int] = (1, 8, 32)
    closed_requests: int = 2000
    closed_time_limit_s: float = 15.0
    vllm: bool = True
    vllm_rates: Sequence[float] = (2, 5, 10, 20)
    vllm_duration_s: float = 10.0
    litellm: bool = False
    litellm_rates: Sequence[float] = (10, 20, 50, 100, 200)
    paced_itl_ms: float = 5.0
    paced_rates: Sequence[float] = (50, 200)
    client: str = "aiohttp"
    seed: int = 0
    warmup: int = 20
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its descendants so far."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in (root, *root.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    except psutil.Error:
        pass
    return total


def closed_loop(
    paths: Sequence[tuple[str, str, str]],
    pids: dict[str, int],
    levels: Sequence[int],
    n: int,
    *,
    prompt_tokens: int,
    max_tokens: int,
    client: str,
    api_key: str | None = None,
    time_limit_s: float = 15.0,
    log: Log = print,
) -> list[dict[str, Any]]:
    """Each path (tag, url, model) alone at each concurrency, non-streaming, ``n`` requests or
    ``time_limit_s`` (a slow path sends fewer: the rest are counted as not sent).

    Besides the usual summary, each entry has the CPU microseconds per completed request spent by
    each process in ``pids`` (``upstream``, ``gateway``, ...) and by the load generator itself.
    """
    spec = WorkloadSpec(models=["m"], prompt_tokens=prompt_tokens, max_tokens=max_tokens)

    async def go() -> list[dict[str, Any]]:
        out = []
        sender = make_sender(client, api_key=api_key, timeout_s=30.0, max_connections=max(levels))
        async with sender:
            for tag, url, model in paths:
                specs = generate(dataclasses.replace(spec, models=[model]), n)
                warm = jobs_for(url, generate(dataclasses.replace(spec, models=[model], seed=7), 50), tag)
                await run_closed_loop(sender, warm, 4, time_limit_s=30.0, drain_s=0.0)
                for c in levels:
                    before = {k: _cpu_s(p) for k, p in pids.items()}
                    gen0 = time.process_time()
                    run = await run_closed_loop(
                        sender, jobs_for(url, specs, tag), c, time_limit_s=time_limit_s, drain_s=10.0
                    )
                    gen = time.process_time() - gen0
                    s = stats.summarize(run.records, duration_s=run.duration_s, requested=n)
                    done = max(1, s["requests"]["completed"])
                    cpu = {k: (_cpu_s(p) - before[k]) / done * 1e6 for k, p in pids.items()}
                    cpu["load_generator"] = gen / done * 1e6
                    out.append({"path": tag, "concurrency": c, "summary": s, "cpu_us_per_request": cpu})
                    log(
                        f"closed loop {tag} c={c}: {s['request_throughput']:.0f} req/s, e2e p50 "
                        f"{s['e2e_ms']['p50']:.2f} ms p99 {s['e2e_ms']['p99']:.2f} ms, "
                        f"{s['requests']['failed']} failed"
                    )
        return out

    return run_sync(go())


@contextlib.contextmanager
def fast_upstream(workdir: Path, served_name: str = "base", itl_ms: float = 0.0) -> Iterator[Server]:
    port = free_port()
    argv = [sys.executable, "-m", upstream.MODULE, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--served-model-name", served_name, "--itl-ms", str(itl_ms)]
    url = f"http://127.0.0.1:{port}"
    name = "fast-upstream" if not itl_ms else f"paced-upstream-{itl_ms:g}ms"
    with process(name, argv, url, workdir / f"{name}.log", timeout_s=30) as s:
        yield s


def attached_gateway_settings(upstream: str, served_name: str, workdir: Path) -> dict[str, Any]:
    """A gateway attached to ``upstream``, with no adapters (an empty ``adapters_dir``)."""
    empty = workdir / "no-adapters"
    empty.mkdir(parents=True, exist_ok=True)
    engine = {"mode": "attached", "url": upstream, "served_model_name": served_name, "health_interval_s": 5.0}
    return {"engine": engine, "adapters_dir": str(empty)}


def _level(payload: dict[str, Any], rate: float, mode: str) -> dict[str, Any] | None:
    return next((lv for lv in payload["levels"] if lv["rate"] == rate and lv["mode"] == mode), None)


def run_suite(cfg: SuiteConfig, log: Log = print) -> dict[str, Any]:
    """Run every part, write every file; returns the top-level payload."""
    started = dt.datetime.now(dt.UTC)
    cfg.out.mkdir(parents=True, exist_ok=True)
    parts: dict[str, Any] = {}
    rates = sorted({*cfg.rates, TARGET_RATE})
    common = {
        "modes": list(cfg.modes),
        "prompt_tokens": cfg.prompt_tokens,
        "max_tokens": cfg.max_tokens,
        "client": cfg.client,
        "seed": cfg.seed,
        "warmup": cfg.warmup,
        "keep_records": False,
    }

    def show(part: str) -> Callable[[dict[str, Any]], None]:
        def on_level(lv: dict[str, Any]) -> None:
            key = "e2e_ms" if lv["mode"] == "nonstream" else "ttfb_ms"
            a = lv["added_ms"][key]
            line = f"{part} rate={lv['rate']:g} {lv['mode']}: gateway added {key[:-3]} p50 "
            line += f"{_f(a['p50'])} p99 {_f(a['p99'])} ms, sustained {lv['sustained']}"
            for tag, o in lv.get("others", {}).items():
                line += (
                    f"; {tag} added p50 {_f(o['added_ms'][key]['p50'])} p99 {_f(o['added_ms'][key]['p99'])}"
                )
                line += f" ms, sustained {o['sustained']}"
            log(line)

        return on_level

    with tempfile.TemporaryDirectory(prefix="lora-gateway-overhead-") as tmp:
        work = Path(tmp)
        with fast_upstream(work) as up:
            settings = attached_gateway_settings(up.url, "base", work)
            with gateway_process(settings, work) as gw:
                log(f"fast upstream {up.url}, gateway {gw.url}")
                fast = run_overhead(
                    up.url,
                    gw.url,
                    rates,
                    cfg.duration_s,
                    model="base",
                    p99_target_ms=cfg.p99_target_ms,
                    on_level=show("fast"),
                    **common,
                )
                write_overhead_report(cfg.out / "fast", fast)
                parts["fast"] = fast
                paths = [("direct", up.url, "base"), ("gateway", gw.url, "base")]
                pids = {"upstream": up.pid, "gateway": gw.pid}
                if cfg.litellm:
                    from loadtest.servers.litellm_proxy import serve as litellm_serve

                    log("LiteLLM: preparing its venv (the first time takes minutes) and starting it")
                    with litellm_serve(up.url, "base", log=work / "litellm.log") as lite:
                        log(f"LiteLLM {lite.version} at {lite.url}")
                        lpaths = [*paths, ("litellm", lite.url, "base")]
                        parts["closed_loop"] = closed_loop(
                            lpaths,
                            {**pids, "litellm": lite.pid},
                            cfg.closed_loop,
                            cfg.closed_requests,
                            prompt_tokens=cfg.prompt_tokens,
                            max_tokens=cfg.max_tokens,
                            client=cfg.client,
                            api_key=lite.master_key,
                            time_limit_s=cfg.closed_time_limit_s,
                            log=log,
                        )
                        lt = run_overhead(
                            up.url,
                            gw.url,
                            cfg.litellm_rates,
                            cfg.duration_s,
                            model="base",
                            p99_target_ms=cfg.p99_target_ms,
                            others={"litellm": (lite.url, "base")},
                            stop_when="litellm",
                            api_key=lite.master_key,
                            on_level=show("litellm"),
                            **common,
                        )
                        lt["litellm_version"] = lite.version
                        write_overhead_report(cfg.out / "litellm", lt)
                        parts["litellm"] = lt
                else:
                    parts["closed_loop"] = closed_loop(
                        paths,
                        pids,
                        cfg.closed_loop,
                        cfg.closed_requests,
                        prompt_tokens=cfg.prompt_tokens,
                        max_tokens=cfg.max_tokens,
                        client=cfg.client,
                        time_limit_s=cfg.closed_time_limit_s,
                        log=log,
                    )
        if cfg.paced_itl_ms > 0:
            parts["paced"] = _paced_part(cfg, work, common, show("paced"), log)
        if cfg.vllm:
            parts["vllm"] = _vllm_part(cfg, work, common, show("vllm"), log)
    payload = {
        "kind": "overhead_suite",
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": cfg.to_dict(),
        "targets": targets(parts, cfg.p99_target_ms),
        "closed_loop": parts.get("closed_loop", []),
        "parts": {k: f"{k}/results.json" for k in ("fast", "litellm", "paced", "vllm") if k in parts},
    }
    from loadtest.overhead.suite_report import write_suite_report

    write_suite_report(cfg.out, payload)
    return payload


def _paced_part(
    cfg: SuiteConfig, work: Path, common: dict[str, Any], on_level: Callable[[dict[str, Any]], None], log: Log
) -> dict[str, Any]:
    """Streams paced like an engine (a chunk every ``paced_itl_ms``): is the gap the same through the
    gateway? (The instant upstream sends every chunk at once; the tiny vLLM on a shared CPU often does.)"""
    with fast_upstream(work, itl_ms=cfg.paced_itl_ms) as up:
        settings = attached_gateway_settings(up.url, "base", work)
        with gateway_process(settings, work, name="gateway-paced") as gw:
            log(f"paced upstream ({cfg.paced_itl_ms:g} ms between chunks) {up.url}, gateway {gw.url}")
            payload = run_overhead(
                up.url,
                gw.url,
                cfg.paced_rates,
                cfg.duration_s,
                model="base",
                p99_target_ms=60_000.0,  # streams last max_tokens x the gap: not judged against 50 ms
                stop_on_saturation=False,
                on_level=on_level,
                **{**common, "modes": ["stream"]},
            )
    payload["paced_itl_ms"] = cfg.paced_itl_ms
    write_overhead_report(cfg.out / "paced", payload)
    return payload


def _vllm_part(
    cfg: SuiteConfig, work: Path, common: dict[str, Any], on_level: Callable[[dict[str, Any]], None], log: Log
) -> dict[str, Any]:
    """A managed gateway over the embedded tiny model; direct = its vLLM."""
    from adapters.tiny import TINY_NAME, build_tiny
    from gateway.settings import Settings

    # a private copy of the embedded model: a shared cache may be rebuilt under a starting vLLM
    model = work / "base" / TINY_NAME
    shutil.copytree(build_tiny(Settings().cache_dir), model, dirs_exist_ok=True)
    vllm_port = free_port()
    empty = work / "no-adapters"
    empty.mkdir(parents=True, exist_ok=True)
    engine = {
        "model": str(model),
        "mode": "managed",
        "port": vllm_port,
        "max_loras": 2,
        "max_cpu_loras": 4,
        "health_interval_s": 2.0,
        "api_key": (engine_key := secrets.token_urlsafe(16)),  # direct calls to vLLM need its key
    }
    settings = {"engine": engine, "adapters_dir": str(empty)}
    log("starting a managed gateway over the embedded tiny model (vLLM on the CPU takes ~30-60 s)")
    with gateway_process(settings, work, name="gateway-vllm", timeout_s=600) as gw:
        vllm_url = f"http://127.0.0.1:{vllm_port}"
        log(f"vLLM {vllm_url}, gateway {gw.url}")
        payload = run_overhead(
            vllm_url,
            gw.url,
            cfg.vllm_rates,
            cfg.vllm_duration_s,
            model=TINY_NAME,
            p99_target_ms=60_000.0,  # not judged here: the engine is the bottleneck, by design
            stop_on_saturation=False,
            timeout_s=60.0,
            ignore_eos=True,
            extra_body={"return_token_ids": True},  # a chunk per token: the gap is the inter-token gap
            on_level=on_level,
            api_key=engine_key,  # vLLM's; the gateway (no auth.api_keys) ignores it and sends its own
            **common,
        )
    write_overhead_report(cfg.out / "vllm", payload)
    return payload


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def targets(parts: dict[str, Any], p99_target_ms: float) -> dict[str, Any]:
    """The issue's overhead targets, measured value next to each (None where not measured)."""
    out: dict[str, Any] = {}
    fast = parts.get("fast")
    if fast:
        ns, st = _level(fast, TARGET_RATE, "nonstream"), _level(fast, TARGET_RATE, "stream")
        out["added_p50_ms_at_200"] = ns and ns["added_ms"]["e2e_ms"]["p50"]
        out["added_p99_ms_at_200"] = ns and ns["added_ms"]["e2e_ms"]["p99"]
        out["stream_added_ttfb_p50_ms_at_200"] = st and st["added_ms"]["ttfb_ms"]["p50"]
        out["stream_added_ttfb_p99_ms_at_200"] = st and st["added_ms"]["ttfb_ms"]["p99"]
        out["stream_added_itl_p50_ms_at_200"] = st and st["added_ms"]["itl_ms"]["p50"]
        out["max_sustained_rate"] = fast["max_sustained_rate"]
        out["p99_target_ms"] = p99_target_ms
        out["tested_rates"] = sorted({lv["rate"] for lv in fast["levels"]})
    paced = parts.get("paced")
    if paced:
        out["paced_stream_itl"] = [
            {
                "rate": lv["rate"],
                "itl_ms": paced["paced_itl_ms"],
                "itl_p50_direct_ms": lv["direct"]["itl_ms"]["p50"],
                "itl_p50_gateway_ms": lv["gateway"]["itl_ms"]["p50"],
                "itl_p99_direct_ms": lv["direct"]["itl_ms"]["p99"],
                "itl_p99_gateway_ms": lv["gateway"]["itl_ms"]["p99"],
            }
            for lv in paced["levels"]
        ]
    vllm = parts.get("vllm")
    if vllm:
        rows = []
        for lv in vllm["levels"]:
            if lv["mode"] != "stream":
                continue
            d, g = lv["direct"]["itl_ms"], lv["gateway"]["itl_ms"]
            rows.append(
                {
                    "rate": lv["rate"],
                    "itl_p50_direct_ms": d["p50"],
                    "itl_p50_gateway_ms": g["p50"],
                    "itl_p99_direct_ms": d["p99"],
                    "itl_p99_gateway_ms": g["p99"],
                    "added_ttfb_p50_ms": lv["added_ms"]["ttfb_ms"]["p50"],
                }
            )
        out["vllm_stream_itl"] = rows
    lite = parts.get("litellm")
    if lite:
        rows = []
        for lv in lite["levels"]:
            key = "e2e_ms" if lv["mode"] == "nonstream" else "ttfb_ms"
            g, o = lv["added_ms"][key]["p50"], lv["others"]["litellm"]["added_ms"][key]["p50"]
            rows.append(
                {
                    "rate": lv["rate"],
                    "mode": lv["mode"],
                    "gateway_added_p50_ms": g,
                    "litellm_added_p50_ms": o,
                    "ratio_p50": (o / g) if g and o is not None and g > 0 else None,
                    "litellm_sustained": lv["others"]["litellm"]["sustained"],
                }
            )
        out["litellm"] = {
            "version": lite.get("litellm_version"),
            "levels": rows,
            "max_sustained_rate": lite["others_max_sustained_rate"]["litellm"],
        }
    return out
