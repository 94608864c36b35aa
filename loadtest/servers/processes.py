"""The servers a benchmark starts and stops itself, each in its own process, and what is read from them.

- :func:`gateway_process`  ``lora-gateway serve --config <tmp yaml>`` with its own ``data_dir``
- :func:`vllm_process`     ``python -m vllm.entrypoints.openai.api_server`` on loopback, with or
                           without ``--enable-lora`` (the command a managed gateway would run)
- :func:`tree_memory`      RSS (and PSS where readable) summed over a process and its descendants
- :func:`dir_bytes`        bytes of the files under a folder (model and adapter sizes)
- :func:`scrape_counters`  a gateway's ``/metrics`` counters, summed over labels

Every process gets its own session (process group), is stopped with SIGTERM to the group, then
SIGKILL after a grace period, and logs to a file whose tail is shown when it fails to start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtest.servers.serving import free_port

ROOT = Path(__file__).resolve().parents[2]
VLLM_START_TIMEOUT_S = 600.0
GATEWAY_START_TIMEOUT_S = 120.0


@dataclass(slots=True)
class Server:
    """A started server: its base URL, its root process, its log file."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready_path: str = "/health"
    timeout_s: float = 60.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self) -> Server:
        """Poll ``url + ready_path`` until 200; fail early (with the log's tail) if the process exits."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(self.url + self.ready_path, timeout=2.0, trust_env=False)
                if r.status_code == 200:
                    return self
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {self.timeout_s:g} s:\n{self.log_tail()}")
            time.sleep(0.25)


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group (vLLM's engine core, workers)
    if proc.poll() is None:
        proc.wait(timeout=10)


@contextlib.contextmanager
def process(
    name: str,
    argv: Sequence[str],
    url: str,
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    ready_path: str = "/health",
    timeout_s: float = 60.0,
    grace_s: float = 30.0,
    wait: bool = True,
) -> Iterator[Server]:
    """Start ``argv`` in its own session, wait for ``url + ready_path`` (unless ``wait`` is False:
    then call ``wait_ready()``, so that several slow starts overlap), yield, then stop the group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=ROOT,
            start_new_session=True,
        )
    server = Server(name, url, proc, log, ready_path, timeout_s)
    try:
        if wait:
            server.wait_ready()
        yield server
    finally:
        _stop(proc, grace_s)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_GATEWAY_")}
    path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(PYTHONPATH=path, PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost", **extra)
    return env


@contextlib.contextmanager
def gateway_process(
    settings: Mapping[str, Any],
    workdir: Path,
    *,
    name: str = "gateway",
    timeout_s: float = GATEWAY_START_TIMEOUT_S,
    wait: bool = True,
) -> Iterator[Server]:
    """``lora-gateway serve --config`` with ``settings`` (plus a free port, its own ``data_dir`` under
    ``workdir`` and ``log_level: warning`` unless given); ready when ``/health`` answers 200."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {"log_level": "warning", "data_dir": str(workdir / f"{name}-data"), **settings}
    cfg.setdefault("port", free_port())
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)]
    url = f"http://127.0.0.1:{cfg['port']}"
    log = workdir / f"{name}.log"
    with process(name, argv, url, log, env=_clean_env(), timeout_s=timeout_s, wait=wait) as s:
        yield s


@dataclass(frozen=True, slots=True)
class LoraOptions:
    """vLLM's LoRA flags; ``None`` in :func:`vllm_process` means no ``--enable-lora`` at all."""

    max_loras: int = 2
    max_lora_rank: int = 16
    max_cpu_loras: int = 4
    compile: bool = True  # the engine plugin compiles the LoRA model (engine.lora_compile)


def vllm_argv(
    model: str | Path,
    served_name: str,
    port: int,
    lora: LoraOptions | None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The same command a managed gateway runs (``gateway.engines.managed.vllm_command``), or, without
    ``lora``, plain vLLM serving one (merged) model."""
    from gateway.engines.managed import vllm_command
    from gateway.settings import EngineSettings

    if lora is not None:
        engine = EngineSettings(
            port=port,
            max_loras=lora.max_loras,
            max_lora_rank=lora.max_lora_rank,
            max_cpu_loras=lora.max_cpu_loras,
            extra_args=list(extra_args),
        )
        return vllm_command(engine, str(model), served_name)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    argv += ["--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port)]
    return argv + list(extra_args)


def vllm_process_env(lora: LoraOptions | None) -> dict[str, str]:
    """The managed gateway's environment for vLLM (the engine plugin's switches included), this checkout on
    its PYTHONPATH."""
    from gateway.engines.managed import vllm_env
    from gateway.settings import EngineSettings

    compile_lora = lora.compile if lora is not None else True
    return {**vllm_env(EngineSettings(lora_compile=compile_lora)), **_clean_env()}


@contextlib.contextmanager
def vllm_process(
    model: str | Path,
    served_name: str,
    log: Path,
    *,
    lora: LoraOptions | None = None,
    extra_args: Sequence[str] = (),
    name: str = "vllm",
    timeout_s: float = VLLM_START_TIMEOUT_S,
    wait: bool = True,
) -> Iterator[Server]:
    """vLLM on a free loopback port with the managed gateway's environment; ready on ``/v1/models``."""
    port = free_port()
    argv = vllm_argv(model, served_name, port, lora, extra_args)
    env = vllm_process_env(lora)
    url = f"http://127.0.0.1:{port}"
    with process(name, argv, url, log, env=env, ready_path="/v1/models", timeout_s=timeout_s, wait=wait) as s:
        yield s


# -- what is read from them --------------------------------------------------------------------


def tree_memory(pid: int) -> dict[str, Any]:
    """RSS and PSS (bytes) summed over ``pid`` and its descendants, and how many processes.

    RSS counts shared pages (libraries, torch) once per process, so the sum overstates what the
    tree costs; PSS splits shared pages between their users, so it adds up (None if unreadable).
    """
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {"rss_bytes": None, "pss_bytes": None, "processes": 0}
    rss, pss, n = 0, 0, 0
    pss_ok = True
    for p in procs:
        try:
            rss += p.memory_info().rss
            n += 1
        except psutil.Error:
            continue
        try:
            pss += p.memory_full_info().pss
        except (psutil.Error, AttributeError):
            pss_ok = False
    return {"rss_bytes": rss, "pss_bytes": pss if pss_ok else None, "processes": n}


def gpu_memory(pid: int) -> int | None:
    """GPU memory (bytes) used by ``pid``'s tree per ``nvidia-smi``; None without NVIDIA GPUs."""
    import shutil

    import psutil

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        root = psutil.Process(pid)
        pids = {root.pid, *(c.pid for c in root.children(recursive=True))}
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (psutil.Error, subprocess.SubprocessError, OSError):
        return None
    total = 0
    for line in out.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
            total += int(float(parts[1]) * 2**20)
    return total


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (a file: its size)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def scrape_counters(url: str, names: Sequence[str], *, timeout_s: float = 10.0) -> dict[str, float]:
    """Each counter in ``names`` (sample names, ``..._total``) summed over its labels; 0 if absent.

    A name may carry one label filter, ``name{label=value}``.
    """
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout_s, trust_env=False).text
    wanted: dict[str, tuple[str, str | None, str | None]] = {}
    for full in names:
        base, _, rest = full.partition("{")
        label, _, value = rest.rstrip("}").partition("=")
        wanted[full] = (base, label or None, value.strip('"') if value else None)
    out = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for full, (base, label, value) in wanted.items():
                if sample.name == base and (label is None or sample.labels.get(label) == value):
                    out[full] += sample.value
    return out
