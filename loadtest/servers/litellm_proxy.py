"""LiteLLM's proxy as a point of comparison, in its own virtual environment.

LiteLLM is not a dependency of this project: :func:`ensure_venv` makes ``.cache/litellm-venv``
(``python -m venv`` + ``pip install 'litellm[proxy]==VERSION'``, ~6 minutes the first time on the
2-core dev box, then reused) and :func:`serve` runs ``litellm --config ...`` from it, pointed at an
OpenAI-compatible upstream (the fast upstream in ``loadtest overhead --litellm``), with one worker
(one process, as the gateway), no database, a master key, and the model cost map read locally (no
network at start). Requests must carry ``Authorization: Bearer <master key>``.

    python -m loadtest.servers.litellm_proxy            # only build the venv (prints its path)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LITELLM_VERSION = "1.108.7"
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = ROOT / ".cache" / "litellm-venv"
INSTALL_TIMEOUT_S = 1800.0
START_TIMEOUT_S = 180.0


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_version(venv: Path) -> str | None:
    """The litellm version in ``venv``, None when there is none."""
    py = venv_python(venv)
    if not py.exists():
        return None
    probe = "from importlib.metadata import version; print(version('litellm'))"
    done = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or None if done.returncode == 0 else None


def ensure_venv(
    venv: Path = DEFAULT_VENV, version: str = LITELLM_VERSION, *, log: Path | None = None
) -> Path:
    """Create ``venv`` with ``litellm[proxy]==version`` unless it already has it; returns its python."""
    if installed_version(venv) == version:
        return venv_python(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        if not venv_python(venv).exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=out, stderr=out)
        pip = [str(venv_python(venv)), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run(
            [*pip, f"litellm[proxy]=={version}"],
            check=True,
            stdout=out,
            stderr=out,
            timeout=INSTALL_TIMEOUT_S,
        )
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    if installed_version(venv) != version:
        raise RuntimeError(f"litellm {version} did not install into {venv}")
    return venv_python(venv)


@dataclass(frozen=True, slots=True)
class LiteLLMProxy:
    url: str
    master_key: str
    model: str
    version: str
    pid: int


def config_yaml(upstream: str, model: str, master_key: str) -> str:
    """A proxy config: ``model`` routed to ``upstream`` as an OpenAI-compatible provider."""
    return (
        "model_list:\n"
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: {upstream.rstrip('/')}/v1\n"
        "      api_key: unused\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  set_verbose: false\n"
        "  request_timeout: 30\n"
        "general_settings:\n"
        f"  master_key: {master_key}\n"
        "  disable_spend_logs: true\n"
    )


@contextlib.contextmanager
def serve(
    upstream: str,
    model: str = "base",
    *,
    venv: Path = DEFAULT_VENV,
    port: int | None = None,
    log: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> Iterator[LiteLLMProxy]:
    """Run LiteLLM's proxy (one worker) in front of ``upstream``; yields it ready, stops it after."""
    from loadtest.servers.serving import free_port, stop, wait_ready

    py = ensure_venv(venv, log=log)
    version = installed_version(venv) or "?"
    port = port or free_port()
    master_key = "sk-" + secrets.token_hex(12)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM", "OPENAI", "DATABASE"))}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", NO_PROXY="127.0.0.1,localhost")
    with tempfile.TemporaryDirectory(prefix="litellm-") as tmp:
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(config_yaml(upstream, model, master_key))
        cmd = [str(py), "-m", "litellm.proxy.proxy_cli", "--config", str(cfg)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, timeout_s=timeout_s, proc=proc, path="/health/liveliness")
            yield LiteLLMProxy(url, master_key, model, version, proc.pid)
        finally:
            stop(proc, grace_s=20)
            if log:
                out.close()  # type: ignore[union-attr]


if __name__ == "__main__":
    print(ensure_venv(log=DEFAULT_VENV.parent / "litellm-install.log"))
