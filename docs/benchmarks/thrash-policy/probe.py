"""The drain-policy experiment of docs/benchmarks.md: one vLLM (16 LoRA slots), a gateway keeping all 16
random adapters loaded and one keeping 8, alternated over several repeats (zipf:1.1, streaming, closed
loop). One JSON row per repeat, level and gateway.

    python docs/benchmarks/thrash-policy/probe.py WORKDIR LEVELS REQUESTS RESIDENT REPEATS [DRAIN_AFTER_S]
    python docs/benchmarks/thrash-policy/probe.py /tmp/w 16,64 400 8 4 1.0 > drain-after-1s.json
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from loadtest.compare.run import CompareConfig, Runner, gateway_settings
from loadtest.harness.options import base_and_adapters
from loadtest.harness.scenario import max_lora_rank, unload_all
from loadtest.harness.sweep import SweepConfig, run_sweep
from loadtest.servers.processes import LoraOptions, gateway_process, scrape_counters, vllm_process

LOADS = "lora_gateway_adapter_loads_total"


def main(
    work: Path, levels: list[int], requests: int, resident: int, repeats: int, drain: str | None
) -> None:
    work.mkdir(parents=True, exist_ok=True)
    base_dir, base_name, adapters = base_and_adapters("tiny", None, 16, None)
    snap, adir = work / "base" / base_name, work / "adapters"
    shutil.copytree(base_dir, snap, dirs_exist_ok=True)
    for a in adapters:
        shutil.copytree(a, adir / a.name, dirs_exist_ok=True)
    names = [a.name for a in adapters]
    cfg = CompareConfig(
        base=snap, adapters=adapters, out=work / "out", base_name=base_name, requests=requests
    )
    runner = Runner(cfg, print)
    lora = LoraOptions(max_loras=len(names), max_lora_rank=max_lora_rank(adapters), max_cpu_loras=len(names))
    rows = []
    with vllm_process(snap, base_name, work / "vllm.log", lora=lora, name="vllm-lora") as vllm:
        for rep in range(repeats):
            for res in (len(names), resident) if rep % 2 == 0 else (resident, len(names)):
                unload_all(vllm.url)
                settings = gateway_settings(cfg, vllm, adir, res)
                if drain is not None:
                    settings["registry"]["drain_after_s"] = float(drain)
                with gateway_process(settings, work, name=f"gw{res}-{rep}") as gw:
                    runner.warm(gw.url, names)
                    for c in levels:
                        sweep = SweepConfig(
                            target=gw.url, workload=runner.workload(names), mode="concurrency", levels=[c],
                            requests=requests, timeout_s=cfg.timeout_s, time_limit_s=cfg.time_limit_s,
                        )  # fmt: skip
                        before = scrape_counters(gw.url, [LOADS])[LOADS]
                        s = run_sweep(sweep).payload["levels"][0]["summary"]
                        loads = scrape_counters(gw.url, [LOADS])[LOADS] - before
                        t = s["ttft_ms"]
                        rows.append(
                            {"rep": rep, "res": res, "c": c, "rps": s["request_throughput"], "p50": t["p50"],
                             "p90": t["p90"], "p99": t["p99"], "tpot": s["tpot_ms"]["p50"], "loads": loads,
                             "failed": s["requests"]["failed"]}
                        )  # fmt: skip
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(
        Path(a[0]),
        [int(x) for x in a[1].split(",")],
        int(a[2]),
        int(a[3]),
        int(a[4]),
        a[5] if len(a) > 5 else None,
    )
