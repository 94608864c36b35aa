"""The harness through the real HTTP path: ``loadtest.servers.fast_upstream`` served by uvicorn on a free
loopback port, driven closed-loop and open-loop, streaming and not, with both clients; the files
a run writes and the consistency of their numbers; the time limit; the overhead plumbing; the CLI.

What depends on the pace of the loops is shown with an upstream whose answers wait on events (``Gate``),
not on the clock, so that a loaded machine cannot fail it: the open loop keeps sending while nothing is
answered, and the time limit ends a run whose requests are never answered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from loadtest.cli import app
from loadtest.harness.report import write_run_report
from loadtest.harness.runner import run_closed_loop, run_open_loop, run_sync
from loadtest.harness.senders import jobs_for, make_sender
from loadtest.harness.sweep import SweepConfig, run_sweep
from loadtest.harness.workload import WorkloadSpec, generate
from loadtest.overhead.report import write_overhead_report
from loadtest.overhead.run import run_overhead
from loadtest.servers.fast_upstream import FastUpstream, UpstreamConfig, serve_in_subprocess, serve_in_thread
from loadtest.servers.serving import serve_in_thread as serve_app

PNG = b"\x89PNG\r\n\x1a\n"


class Gate:
    """The fast upstream, its completions held on events instead of answered at once: with ``together=n``
    none is answered before ``n`` have arrived (then all are); with ``hold=True`` none is ever answered (each
    waits until its client goes away)."""

    def __init__(self, *, together: int | None = None, hold: bool = False) -> None:
        self.inner, self.together, self.hold = FastUpstream(), together, hold
        self.arrived = 0
        self.all_here = asyncio.Event()  # bound to the server's loop when first awaited

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("completions"):
            return await self.inner(scope, receive, send)
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.arrived += 1
        if self.hold:
            while (await receive())["type"] != "http.disconnect":
                pass
            return None
        if self.together is not None:
            if self.arrived >= self.together:
                self.all_here.set()
            await self.all_here.wait()

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.inner(scope, replay, send)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serve_in_thread() as url:
        yield url


def ordered(d: dict[str, Any]) -> bool:
    return d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"]


def check_run_files(out: Path, payload: dict[str, Any], n: int) -> None:
    mode = payload["config"]["mode"]
    for name in ("results.json", "report.md", "requests.jsonl"):
        assert (out / name).stat().st_size > 0, name
    for name in (f"latency_vs_{mode}.png", f"throughput_vs_{mode}.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["levels"] == payload["levels"]
    assert saved["machine"]["cpu_count"] >= 1 and saved["machine"]["python"]
    report = (out / "report.md").read_text()
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == sum(lv["summary"]["requests"]["sent"] for lv in payload["levels"])
    for lv in payload["levels"]:
        s = lv["summary"]
        r = s["requests"]
        assert r["requested"] == n
        assert r["completed"] + r["failed"] + r["not_sent"] == n
        assert sum(s["errors"].values()) == r["failed"]
        assert sum(m["requests"]["sent"] for m in lv["per_model"].values()) == r["sent"]
        assert sum(m["requests"]["completed"] for m in lv["per_model"].values()) == r["completed"]
        assert ordered(s["e2e_ms"])
        assert s["request_throughput"] > 0 and s["output_token_throughput"] > 0
        assert f"| {lv['level']} |" in report


def test_closed_loop_streaming_mixed_models(upstream: str, tmp_path: Path) -> None:
    n = 30
    workload = WorkloadSpec(
        models=["a", "b", "c"], mix="zipf:1.2", prompt_tokens=16, max_tokens=5, stream=True
    )
    cfg = SweepConfig(
        target=upstream + "/v1", workload=workload, mode="concurrency", levels=[1, 4], requests=n
    )
    seen: list[Any] = []
    result = run_sweep(cfg, on_result=seen.append)
    files = write_run_report(tmp_path, result.payload, result.records)
    assert len(seen) == 2 * n and set(files) >= {"results", "report", "requests"}
    check_run_files(tmp_path, result.payload, n)
    for lv in result.payload["levels"]:
        s = lv["summary"]
        assert s["requests"]["completed"] == n and s["errors"] == {}
        assert set(lv["per_model"]) == {"a", "b", "c"}
        assert s["usage_reported"] == n and s["total_output_tokens"] == 5 * n
        assert s["total_input_tokens"] == 16 * n  # the fast upstream counts words
        for key in ("ttft_ms", "ttfb_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert ordered(s[key]), key
        assert s["itl_ms"]["count"] == 4 * n  # 5 content chunks, 4 gaps
        assert s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
        assert s["send_lag_ms"]["count"] == 0  # closed loop: no schedule
    assert "TTFT" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("client", ["httpx", "aiohttp"])
def test_open_loop_non_streaming(upstream: str, tmp_path: Path, client: str) -> None:
    n = 40
    workload = WorkloadSpec(models=["a", "b"], prompt_tokens=8, max_tokens=3, seed=7)
    cfg = SweepConfig(
        target=upstream, workload=workload, mode="rate", levels=[100, 400], requests=n, client=client
    )
    result = run_sweep(cfg)
    write_run_report(tmp_path, result.payload, result.records)
    check_run_files(tmp_path, result.payload, n)
    for lv in result.payload["levels"]:
        s = lv["summary"]
        assert s["requests"]["completed"] == n
        assert s["ttft_ms"]["count"] == 0 and s["tpot_ms"]["count"] == 0  # not streamed
        assert s["send_lag_ms"]["count"] == n and ordered(s["send_lag_ms"])
        assert s["total_output_tokens"] == 3 * n
    # the same seed gives the same request sequence at every level
    models = [[r.model for r in recs] for _, recs in result.records]
    assert sorted(models[0]) == sorted(models[1])


@pytest.mark.parametrize("client", ["httpx", "aiohttp"])
def test_open_loop_does_not_wait_for_answers(client: str) -> None:
    """No request is answered before all of them have been sent: only a loop that sends on its schedule,
    whatever the answers do, gets any answer at all (a loop that waited would time out every request)."""
    n = 8
    with serve_app(Gate(together=n)) as url:
        jobs = jobs_for(url, generate(WorkloadSpec(models=["m"], max_tokens=2), n))

        async def go() -> Any:
            async with make_sender(client, timeout_s=30) as sender:
                return await run_open_loop(sender, jobs, 1000)

        run = run_sync(go())
    assert [r.ok for r in run.records] == [True] * n, [r.error for r in run.records]
    assert not run.hit_time_limit


def test_completions_stream_with_aiohttp(upstream: str) -> None:
    workload = WorkloadSpec(models=["m"], endpoint="completions", stream=True, max_tokens=4)
    cfg = SweepConfig(
        target=upstream, workload=workload, mode="concurrency", levels=[2], requests=6, client="aiohttp"
    )
    s = run_sweep(cfg).payload["levels"][0]["summary"]
    assert s["requests"]["completed"] == 6 and s["total_output_tokens"] == 24 and s["ttft_ms"]["count"] == 6


def test_errors_are_counted_not_raised(tmp_path: Path) -> None:
    with serve_in_thread(UpstreamConfig(strict_models=True)) as url:
        workload = WorkloadSpec(models=["base", "unknown"], stream=True, max_tokens=2)
        cfg = SweepConfig(target=url, workload=workload, mode="concurrency", levels=[2], requests=20)
        result = run_sweep(cfg)
    write_run_report(tmp_path, result.payload, result.records)
    lv = result.payload["levels"][0]
    s = lv["summary"]
    assert s["errors"] == {"404": lv["per_model"]["unknown"]["requests"]["sent"]}
    assert lv["per_model"]["unknown"]["requests"]["completed"] == 0
    assert s["requests"]["completed"] == lv["per_model"]["base"]["requests"]["sent"] > 0
    assert f"| 2 | 404 | {s['errors']['404']} |" in (tmp_path / "report.md").read_text()

    dead = WorkloadSpec(models=["m"])
    cfg = SweepConfig(
        target="http://127.0.0.1:9", workload=dead, mode="concurrency", levels=[2], requests=4, timeout_s=2
    )
    s = run_sweep(cfg).payload["levels"][0]["summary"]
    assert s["requests"]["failed"] == 4 and s["errors"] == {"ConnectError": 4}


def test_time_limit_stops_the_run() -> None:
    """Requests that are never answered: the run still ends at its time limit plus the drain, the requests
    in flight then are cancelled (not timed out: the client would wait 60 s), and no other one started."""
    with serve_app(Gate(hold=True)) as url:
        jobs = jobs_for(url, generate(WorkloadSpec(models=["m"], max_tokens=1), 50))

        async def go() -> Any:
            async with make_sender("httpx", timeout_s=60) as sender:
                return await run_closed_loop(sender, jobs, 2, time_limit_s=1.0, drain_s=0.2)

        run = run_sync(go())
    assert run.hit_time_limit and len(run.records) == 2  # one held request per worker, no more
    assert [r.error_kind for r in run.records] == ["cancelled", "cancelled"]


def test_overhead_plumbing(tmp_path: Path) -> None:
    with serve_in_thread() as direct, serve_in_thread() as gateway:
        payload = run_overhead(
            direct, gateway, [50, 100], 0.4, warmup=4, keep_records=True, stop_on_saturation=False
        )
    files = write_overhead_report(tmp_path, payload)
    assert "_records" not in payload
    for name in ("overhead_added_latency.png", "overhead_p99.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert files["report"].read_text().startswith("# Gateway overhead")
    saved = json.loads(files["results"].read_text())
    assert [(lv["rate"], lv["mode"]) for lv in saved["levels"]] == [
        (50, "nonstream"), (50, "stream"), (100, "nonstream"), (100, "stream")
    ]  # fmt: skip
    for lv in saved["levels"]:
        n = round(lv["rate"] * 0.4)
        for side in ("direct", "gateway"):
            assert lv[side]["requests"]["completed"] == n
            assert ordered(lv[side]["e2e_ms"])
        assert (lv["limited_by"] is None) == lv["sustained"]
        assert set(lv["added_ms"]) == {"e2e_ms", "ttfb_ms", "itl_ms"}
        if lv["mode"] == "stream":
            assert lv["added_ms"]["ttfb_ms"]["p50"] is not None
    assert set(saved["max_sustained_rate"]) == {"nonstream", "stream"}  # judged in test_loadtest_overhead
    assert len(files["requests"].read_text().splitlines()) == 2 * (20 + 20 + 40 + 40)


def test_cli_run_and_overhead(upstream: str, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["run", "--target", upstream, "--models", "a,b", "--rate", "200", "--requests", "10"]
    args += ["--max-tokens", "3", "--stream", "--out", str(tmp_path / "run")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    payload = json.loads((tmp_path / "run" / "results.json").read_text())
    assert payload["levels"][0]["level"] == 200 and payload["config"]["mode"] == "rate"
    assert payload["levels"][0]["summary"]["requests"]["completed"] == 10

    res = runner.invoke(
        app, ["run", "--target", upstream, "--models", "a", "--rate", "1", "--concurrency", "1"]
    )
    assert res.exit_code != 0
    res = runner.invoke(app, ["run", "--target", upstream, "--models", "a", "--mix", "zipf:-1"])
    assert res.exit_code != 0

    out = tmp_path / "ov"
    args = ["overhead", "--direct", upstream, "--gateway", upstream, "--rates", "50", "--duration", "0.2"]
    res = runner.invoke(app, [*args, "--modes", "nonstream", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "report.md").exists() and (out / "overhead_p99.png").exists()


def test_fast_upstream_as_a_process_with_lora_routes() -> None:
    with (
        serve_in_subprocess("--strict-models", "--served-model-name", "tiny") as url,
        httpx.Client(base_url=url, trust_env=False, timeout=5) as c,
    ):
        body = {"model": "sql", "messages": [{"role": "user", "content": "hi"}]}
        assert c.post("/v1/chat/completions", json=body).json()["error"]["code"] == 404
        adapter = {"lora_name": "sql", "lora_path": "/adapters/sql"}
        load = c.post("/v1/load_lora_adapter", json=adapter)
        assert load.status_code == 200 and load.text.startswith("Success")
        assert c.post("/v1/load_lora_adapter", json=adapter).status_code == 400  # already loaded
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["sql"]["parent"] == "tiny" and models["sql"]["root"] == "/adapters/sql"
        done = c.post("/v1/chat/completions", json={**body, "max_tokens": 3}).json()
        assert done["usage"]["completion_tokens"] == 3 and done["model"] == "sql"
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 200
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 404


def test_overhead_starts_and_stops_its_own_servers(tmp_path: Path) -> None:
    """``overhead --out`` alone: the fast upstream and a gateway, each in its own process, then gone."""
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    args = ["overhead", "--out", str(tmp_path), "--no-vllm", "--rates", "50", "--duration", "0.3"]
    res = CliRunner().invoke(app, [*args, "--closed-loop", "1,4", "--closed-requests", "40"])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before  # all stopped
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["parts"] == {"fast": "fast/results.json", "paced": "paced/results.json"}
    t = payload["targets"]
    paced = t["paced_stream_itl"]
    assert [r["rate"] for r in paced] == [50, 200] and all(r["itl_ms"] == 5 for r in paced)
    for r in paced:  # about a chunk every 5 ms on both paths (a busy CPU delays some, then bunches them)
        assert 2.5 < r["itl_p50_direct_ms"] < 25 and 2.5 < r["itl_p50_gateway_ms"] < 25
    assert t["tested_rates"] == [50, 200]  # 200 req/s, the target's rate, is always measured
    assert t["added_p50_ms_at_200"] is not None and t["stream_added_ttfb_p50_ms_at_200"] is not None
    fast = json.loads((tmp_path / "fast" / "results.json").read_text())
    for lv in fast["levels"]:
        for side in ("direct", "gateway"):
            assert lv[side]["requests"]["completed"] == round(lv["rate"] * 0.3)
    closed = payload["closed_loop"]
    assert [(e["path"], e["concurrency"]) for e in closed] == [
        ("direct", 1), ("direct", 4), ("gateway", 1), ("gateway", 4)
    ]  # fmt: skip
    for e in closed:
        assert e["summary"]["requests"]["completed"] == 40 and ordered(e["summary"]["e2e_ms"])
        assert set(e["cpu_us_per_request"]) == {"upstream", "gateway", "load_generator"}
    report = (tmp_path / "report.md").read_text()
    assert "## Targets" in report and "CPU share" in report and "(fast/report.md)" in report
    assert (tmp_path / "fast" / "overhead_p99.png").read_bytes()[:8] == PNG
