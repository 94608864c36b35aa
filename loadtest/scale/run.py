"""Many adapters on one base: the registry at that scale, and vLLM's own benchmark through the gateway with N
adapters against 4, in one sitting.

    python -m loadtest.scale.run --adapters 4,1000 --concurrency 1,8,32 --out docs/benchmarks/scale
    lora-gateway loadtest scale ...            (the same)

1. Makes `max(--adapters)` random rank-8 adapters for the embedded tiny base (cached between runs).
2. Registry: a gateway process (attached to an address where nothing listens: registration needs no
   engine) registers them all through the admin API, `--jobs` at a time (`adapters register-dir`'s path);
   then the times of `GET /admin/adapters` and `GET /v1/models`, and of a restart (process start to
   listening, the registry read back and the adapters folder checked again), and `Registry.resolve`'s cost
   per call with 4 and with all of them registered.
3. Serving, for each `--profile`: vLLM (LoRA on, the profile's `max_loras` / `max_cpu_loras`) and a gateway
   attached to it that has every adapter registered (the profile's `registry.max_resident`); then for each
   concurrency, the benchmark (`vllm.benchmarks.serve`, backend openai, `/v1/completions`, random prompts,
   `--ignore-eos`, `--lora-modules` with the first N adapters: each request picks one uniformly) with 4 and
   with N adapters, the order alternating per level. Request and token throughput, TTFT, the ratio N / 4.
4. Answers checked after the runs: the same greedy prompt to 48 adapters and the base at once, each
   compared with its answer alone (mixed batches must not change an answer); `/metrics` line count.

Writes `results.json` and `report.md` (with the machine) and `throughput.png` under `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

from loadtest.harness.machine import _cpu_model
from loadtest.overhead import relay_cpu
from loadtest.overhead.vllm_bench import bench_once
from loadtest.servers.processes import LoraOptions, gateway_process, vllm_process

KEEP = ("failed", "request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms")

PROFILES: dict[str, dict[str, Any]] = {
    # The gateway's defaults for a managed engine: both vLLM limits sized from memory (gateway/engines/
    # sizing.py; for the tiny base, 32 in a batch and 4,096 in memory), registry.max_resident following them.
    "default": {"max_loras": "auto", "max_cpu_loras": "auto", "max_resident": None},
    # The defaults until 2026-12-03: vLLM keeps 4 adapters in memory and 2 in a batch.
    "before": {"max_loras": 2, "max_cpu_loras": 4, "max_resident": None},
    # vLLM keeps every adapter in memory, 8 in one batch, and the gateway never evicts.
    "sized": {"max_loras": 8, "max_cpu_loras": "all", "max_resident": "all"},
    # ... and as many adapters in one batch as there are clients: vLLM's scheduler runs a batch of at most
    # max_loras distinct adapters, so with more clients than that on distinct adapters, the rest wait.
    "wide": {"max_loras": 32, "max_cpu_loras": "all", "max_resident": "all"},
}
PROMPT = "show users older than 30"


def _cpu_capability() -> str:
    """torch's view of the CPU (AVX2, AVX512, ...): which LoRA product paths the engine plugin can take."""
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except ImportError:
        return "no torch"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _defaults(model_dir: str) -> Any:
    """What a managed gateway on this machine would give vLLM for this base (its `LoraSizing`)."""
    from gateway.settings import Settings

    return Settings(engine={"model": model_dir}).lora_sizing()


def bench(
    url: str, model: str, tokenizer: str, loras: list[str], a: argparse.Namespace, conc: int, seed: int
) -> dict:
    """vLLM's benchmark (loadtest/overhead/vllm_bench.py), each request on one of `loras` at random."""
    return bench_once(
        url, model, tokenizer, a, seed, concurrency=conc, num_prompts=max(a.num_prompts, 16 * conc),
        extra=["--lora-modules", *loras], keep=KEEP,
    )  # fmt: skip


def registry_part(paths: list[Path], work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """Register every adapter through the admin API of a gateway with no engine; list; restart; resolve."""
    nowhere = "http://127.0.0.1:9"  # discard port: nothing answers; registration needs no engine
    settings = {
        "engine": {"mode": "attached", "url": nowhere, "health_interval_s": 30.0},
        "adapters_dir": str(work / "empty"),
        "registry": {"allowed_roots": [str(paths[0].parent)]},
    }
    (work / "empty").mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"adapters": len(paths)}
    with gateway_process(settings, work / "registry-gw", wait=False) as gw:
        _wait_listening(gw.url)
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "gateway.cli", "adapters", "register-dir", str(paths[0].parent),
               "--url", gw.url, "--jobs", str(a.jobs), "--no-upload"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        out["register_all_s"] = round(time.monotonic() - t0, 2)
        out["register_output"] = done.stdout.strip().splitlines()[-1:] + done.stderr.strip().splitlines()[-1:]
        out["register_per_adapter_ms"] = round(out["register_all_s"] / len(paths) * 1e3, 2)
        out["list_adapters_ms"], size = _timed_get(gw.url + "/admin/adapters")
        out["list_adapters_bytes"] = size
        out["v1_models_ms"], out["v1_models_bytes"] = _timed_get(gw.url + "/v1/models")
        log(f"registry: {len(paths)} registered in {out['register_all_s']} s")
    t0 = time.monotonic()
    with gateway_process(settings, work / "registry-gw", wait=False) as gw:
        _wait_listening(gw.url)
        out["restart_to_listening_s"] = round(time.monotonic() - t0, 2)
        names = {a["name"] for a in httpx.get(gw.url + "/admin/adapters", timeout=60).json()["data"]}
        out["after_restart_registered"] = len(names)
    out["resolve_ns"] = _resolve_cost(len(paths))
    return out


def _wait_listening(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url + "/admin/adapters", timeout=5)
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} never answered")


def _timed_get(url: str, rounds: int = 5) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        r = httpx.get(url, timeout=60)
        times.append(time.perf_counter() - t0)
        size = len(r.content)
    return round(statistics.median(times) * 1e3, 2), size


def _resolve_cost(n: int) -> dict[str, float]:
    """ns per `Registry.resolve` with 4 and with `n` names in the snapshot (the request path's lookup)."""
    import asyncio

    from gateway.registry.blobs import BlobStore
    from gateway.registry.service import Registry, RegistryLimits
    from gateway.registry.sqlite import SqliteStore

    costs = {}
    for count in (4, n):
        with tempfile.TemporaryDirectory() as tmp:
            store = SqliteStore(Path(tmp) / "r.sqlite3")
            for i in range(count):
                store.add_version(f"a{i}", digest=f"{i:064x}", source="/x", rank=8, size_bytes=1)
            registry = Registry(store, BlobStore(Path(tmp) / "b"), None, "base", RegistryLimits(16, 1, ()))
            asyncio.run(registry.refresh())
            names = [f"a{i % count}" for i in range(100_000)]
            t0 = time.perf_counter_ns()
            for name in names:
                registry.resolve(name, None)
            costs[str(count)] = round((time.perf_counter_ns() - t0) / len(names), 1)
            store.close()
    return costs


def serving_part(
    profile: str, paths: list[Path], counts: list[int], a: argparse.Namespace, work: Path, model_dir: str
) -> list[dict[str, Any]]:
    spec = PROFILES[profile]
    n_all = len(paths)
    auto = _defaults(model_dir)
    cpu_loras = {"all": n_all, "auto": auto.cpu_loras}.get(spec["max_cpu_loras"], spec["max_cpu_loras"])
    slots = auto.max_loras if spec["max_loras"] == "auto" else spec["max_loras"]
    resident = n_all if spec["max_resident"] == "all" else spec["max_resident"]
    lora = LoraOptions(max_loras=slots, max_cpu_loras=cpu_loras)
    log(f"{profile}: vLLM --max-loras {slots} --max-cpu-loras {cpu_loras}, registry.max_resident {resident}")
    rows: list[dict[str, Any]] = []
    served = "tiny-llama"
    with contextlib.ExitStack() as stack:
        vllm = stack.enter_context(vllm_process(model_dir, served, work / f"vllm-{profile}.log", lora=lora))
        settings: dict[str, Any] = {
            "engine": {"mode": "attached", "url": vllm.url, "served_model_name": served,
                       "max_loras": lora.max_loras, "max_cpu_loras": lora.max_cpu_loras},
            "adapters_dir": str(paths[0].parent),
            "registry": {"max_resident": resident} if resident else {},
        }  # fmt: skip
        t0 = time.monotonic()
        gw = stack.enter_context(gateway_process(settings, work / f"gw-{profile}", timeout_s=1200))
        log(f"{profile}: gateway up with {n_all} adapters seeded in {time.monotonic() - t0:.1f} s")
        names = [p.name for p in paths]
        _settle(gw.url)  # the gateway preloads what vLLM keeps in memory: let it finish first
        bench(gw.url, served, model_dir, names[: max(counts)], a, conc=8, seed=7)  # warm-up, unmeasured
        for li, conc in enumerate(a.concurrency):
            for n in counts:  # vLLM-CPU stalls a batch the first times it meets a shape: meet them unmeasured
                bench(gw.url, served, model_dir, names[:n], a, conc=conc, seed=100 + li)
            for rnd, n in _rounds(counts, li, a.repeat):
                u0, loads0 = _cpu(gw.pid), _loads(gw.url)
                t0 = time.monotonic()
                row = {"profile": profile, "concurrency": conc, "adapters": n, "round": rnd}
                row |= bench(gw.url, served, model_dir, names[:n], a, conc=conc, seed=li + 10 * rnd)
                row["wall_s"] = round(time.monotonic() - t0, 1)
                row["gateway_cpu_s"] = round(_cpu(gw.pid) - u0, 2)
                row["adapter_loads"] = _loads(gw.url) - loads0  # during this run
                rows.append(row)
                log(json.dumps(row))
        if a.zipf:
            rows += _zipf_part(profile, gw.url, names, counts, a)
        rows.append({"profile": profile, "check": _check_answers(gw.url, names, served)})
    return rows


def _zipf_part(
    profile: str, url: str, names: list[str], counts: list[int], a: argparse.Namespace
) -> list[dict[str, Any]]:
    """The project's own harness (loadtest/harness), zipf:1.1 over N adapters against 4, streaming, every
    answer checked against the same request sent alone (`--verify`)."""
    from loadtest.harness.sweep import SweepConfig, run_sweep
    from loadtest.harness.workload import WorkloadSpec

    rows = []
    for li, conc in enumerate(a.concurrency):
        for rnd, n in _rounds(counts, li, a.repeat):
            workload = WorkloadSpec(
                models=names[:n], mix="zipf:1.1", prompt_tokens=a.input_len, max_tokens=a.output_len,
                stream=True, endpoint="completions", seed=li, ignore_eos=True,
                extra_body={"return_token_ids": True},  # answers compared token by token, as compare does
            )  # fmt: skip
            cfg = SweepConfig(
                target=url, workload=workload, mode="concurrency", levels=[float(conc)],
                requests=max(a.num_prompts, 16 * conc), timeout_s=300, warmup=0, client="aiohttp",
                verify=True,
            )  # fmt: skip
            entry = run_sweep(cfg).payload["levels"][0]
            summary, verify = entry["summary"], entry["verify"]
            row = {
                "profile": profile, "mix": "zipf:1.1", "concurrency": conc, "adapters": n, "round": rnd,
                "completed": summary["requests"]["completed"], "failed": summary["requests"]["failed"],
                "request_throughput": summary["request_throughput"],
                "output_throughput": summary["output_token_throughput"],
                "median_ttft_ms": summary["ttft_ms"].get("p50"), "p99_ttft_ms": summary["ttft_ms"].get("p99"),
                "checked": verify["checked"], "wrong": verify["wrong"], "near_ties": verify["near_ties"],
                "wrong_model": verify["wrong_model"], "adapter_loads": None,
            }  # fmt: skip
            rows.append(row)
            log(json.dumps(row))
    return rows


def _rounds(counts: list[int], level: int, repeat: int) -> list[tuple[int, int]]:
    """(round, adapter count) in the order they run: every count once a round, the order alternating."""
    return [(r, n) for r in range(repeat) for n in (counts if (level + r) % 2 == 0 else counts[::-1])]


def _settle(url: str, timeout: float = 900) -> None:
    """Until the gateway's adapter loads stop moving (its start-up preload is over)."""
    deadline, last, still = time.monotonic() + timeout, -1.0, 0
    while time.monotonic() < deadline and still < 3:
        now = _loads(url)
        still = still + 1 if now == last else 0
        last = now
        time.sleep(1)
    log(f"settled after {last:.0f} adapter loads")


def _cpu(pid: int) -> float:
    return sum(relay_cpu._cpu(pid))  # user + system, the process and its children


def _loads(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=60).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("lora_gateway_adapter_loads_total{"))  # fmt: skip


def _check_answers(url: str, names: list[str], base: str) -> dict[str, Any]:
    """48 adapters and the base at once, each against its answer alone (greedy)."""
    models = [base, *names[:: max(1, len(names) // 48)][:48]]

    def ask(model: str) -> str:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        return str(r.json()["choices"][0]["text"])

    alone = {m: ask(m) for m in models}
    with ThreadPoolExecutor(16) as pool:
        together = dict(zip(models, pool.map(ask, models), strict=True))
    wrong = [m for m in models if together[m] != alone[m]]
    lines = len(httpx.get(url + "/metrics", timeout=60).text.splitlines())
    return {"models": len(models), "wrong": len(wrong), "wrong_models": wrong[:10], "metrics_lines": lines}


def _cells(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    """Per (profile, mix, clients, adapters): the median over rounds of each figure, the rounds' req/s."""
    groups: dict[tuple[str, str, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(
            (r["profile"], r.get("mix", "uniform"), r["concurrency"], r["adapters"]), []
        ).append(r)
    cells = {}
    for key, rs in groups.items():
        cell: dict[str, Any] = {"rounds": [round(r["request_throughput"], 1) for r in rs]}
        for f in ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms"):
            cell[f] = statistics.median(r[f] for r in rs)
        loads = [r["adapter_loads"] for r in rs if r.get("adapter_loads") is not None]
        cell["adapter_loads"] = sum(loads) if loads else None
        checked = [r for r in rs if "checked" in r]
        if checked:
            cell |= {k: sum(r[k] for r in checked) for k in ("checked", "wrong", "near_ties")}
        cells[key] = cell
    return cells


def report(payload: dict[str, Any], out: Path) -> None:
    rows = [r for r in payload["serving"] if "adapters" in r]
    cells = _cells(rows)
    base_n = min(payload["adapter_counts"])
    lines = [
        "# Many adapters on one base",
        "",
        f"Machine: {payload['machine']}. Started {payload['started']}; vLLM's own benchmark "
        f"(`vllm.benchmarks.serve`, random {payload['input_len']} in / {payload['output_len']} out, "
        "`--ignore-eos`, uniform choice among `--lora-modules`) through one gateway; zipf:1.1 through the "
        f"project's harness with every answer checked. {payload.get('repeat', 1)} round(s) per cell, the "
        "order of adapter counts alternating; figures are medians over rounds (each round's req/s after).",
        "",
        "## Registry",
        "",
        "```json",
        json.dumps(payload["registry"], indent=2),
        "```",
        "",
        "## Serving",
        "",
        "| profile | mix | clients | adapters | req/s (rounds) | out tok/s | TTFT p50 ms | TTFT p99 ms "
        "| loads | wrong | req/s vs 4 | p99 TTFT vs 4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = list(payload["profiles"])
    for (profile, mix, conc, n), c in sorted(
        cells.items(), key=lambda kv: (order.index(kv[0][0]), *kv[0][1:])
    ):
        four = cells[(profile, mix, conc, base_n)]
        ratio = c["request_throughput"] / four["request_throughput"] if four["request_throughput"] else 0
        ttft = c["p99_ttft_ms"] / four["p99_ttft_ms"] if four["p99_ttft_ms"] else 0
        loads = "-" if c["adapter_loads"] is None else f"{c['adapter_loads']:.0f}"
        wrong = f"{c['wrong']} of {c['checked']} ({c['near_ties']} near ties)" if "checked" in c else "-"
        rounds = ", ".join(f"{x:g}" for x in c["rounds"])
        lines.append(
            f"| {profile} | {mix} | {conc} | {n} | {c['request_throughput']:.1f} ({rounds}) | "
            f"{c['output_throughput']:.0f} | {c['median_ttft_ms']:.0f} | {c['p99_ttft_ms']:.0f} | "
            f"{loads} | {wrong} | {ratio:.2f}x | {ttft:.2f}x |"
        )
    for c in (r for r in payload["serving"] if "check" in r):
        lines += ["", f"Answers checked ({c['profile']}): {json.dumps(c['check'])}"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for profile, mix, n in sorted({(k[0], k[1], k[3]) for k in cells}):
            pts = sorted(
                (k[2], c["request_throughput"])
                for k, c in cells.items()
                if (k[0], k[1], k[3]) == (profile, mix, n)
            )
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{profile} {mix}, {n} adapters")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("clients")
        ax.set_ylabel("requests/s")
        ax.set_title("vLLM benchmark through the gateway: N adapters vs 4")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=120)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", default="4,1000", help="adapter counts, the smallest is the baseline")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--profile", default="default,before", help=f"of {', '.join(PROFILES)}")
    p.add_argument("--num-prompts", type=int, default=160)
    p.add_argument("--input-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--repeat", type=int, default=1, help="rounds per level (the order alternating); medians")
    p.add_argument("--skip-registry", action="store_true")
    p.add_argument("--zipf", action="store_true", help="also zipf:1.1 through the harness, answers checked")
    p.add_argument("--out", type=Path, default=Path("out/scale"))
    a = p.parse_args(argv)
    from adapters.tiny import TINY_NAME, build_tiny
    from gateway.settings import Settings
    from loadtest.harness.scenario import random_adapters

    counts = sorted(int(x) for x in a.adapters.split(","))
    cache = Settings().cache_dir
    base_dir = build_tiny(cache)
    t0 = time.monotonic()
    paths = random_adapters(
        base_dir, TINY_NAME, counts[-1], cache / "loadtest-adapters" / f"scale-{counts[-1]}"
    )
    log(f"{len(paths)} adapters ready in {time.monotonic() - t0:.1f} s")
    payload: dict[str, Any] = {
        "machine": f"{_cpu_model() or 'CPU'} ({_cpu_capability()}), {psutil.cpu_count()} CPUs, "
        f"{round(psutil.virtual_memory().total / 2**30)} GiB, {platform.platform()}",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "adapter_counts": counts,
        "input_len": a.input_len,
        "output_len": a.output_len,
        "profiles": {k: PROFILES[k] for k in a.profile.split(",")},
        "repeat": a.repeat,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lora-gateway-scale-") as tmp:
        work = Path(tmp)
        payload["registry"] = {} if a.skip_registry else registry_part(paths, work, a)
        payload["serving"] = []
        for profile in a.profile.split(","):
            payload["serving"] += serving_part(profile, paths, counts, a, work, str(base_dir))
            (a.out / "results.json").write_text(json.dumps(payload, indent=2))
    report(payload, a.out)
    log(f"wrote {a.out / 'report.md'}")


if __name__ == "__main__":
    main()
