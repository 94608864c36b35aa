"""A vLLM server the gateway spawns and supervises.

    spawn `python -m vllm.entrypoints.openai.api_server --enable-lora ...` bound to loopback
      -> relay its log lines into ours, prefixed `[vllm <name>]`
      -> probe until ready (or the process exits, or the startup timeout passes)
      -> probe every `health_interval_s` while it lives
      -> on exit: mark down (state lost: residency forgets what was loaded), restart after a backoff
    stop: SIGTERM to the process group (vLLM has child processes), SIGKILL after `stop_timeout_s`.

The child also gets PR_SET_PDEATHSIG, so a gateway killed with SIGKILL does not leave vLLM behind.

vLLM requires a key on its /v1 routes (`VLLM_API_KEY`, its `--api-key`): `engine.api_key`, or a new random
one at each start, which the gateway's client then sends on every call to it. In the environment, not on
the command line, so neither `ps` nor our "starting" log line shows it. The child's environment is the
gateway's without the gateway's own settings and secrets (every `LORA_GATEWAY_*`: admin token, API keys,
registry URL; libpq's `PG*`: the registry's password), plus what vLLM needs (`vllm_env`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import sys
import time

from gateway.engines.base import Engine, EngineState
from gateway.engines.client import EngineClient
from gateway.metrics import Metrics
from gateway.settings import ENV_PREFIX, EngineSettings

log = logging.getLogger("lora_gateway.engine")
vllm_log = logging.getLogger("lora_gateway.vllm")


def vllm_command(engine: EngineSettings, model: str, served_name: str) -> list[str]:
    cmd = [
        engine.python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        served_name,
        "--host",
        engine.host,
        "--port",
        str(engine.port),
        "--enable-lora",
        "--max-lora-rank",
        str(engine.max_lora_rank),
    ]
    if engine.max_loras is not None:  # unset: vLLM's default (the pool fills in the sized numbers)
        cmd += ["--max-loras", str(engine.max_loras)]
    if engine.max_cpu_loras is not None:
        cmd += ["--max-cpu-loras", str(engine.max_cpu_loras)]
    if engine.max_model_len:
        cmd += ["--max-model-len", str(engine.max_model_len)]
    if engine.tool_call_parser:  # chat `tools`: `tool_choice` auto, required, or a named function
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", engine.tool_call_parser]
    return cmd + list(engine.extra_args)


def gateway_only(name: str) -> bool:
    """An environment variable that is the gateway's alone: its settings and secrets (LORA_GATEWAY_*,
    among them the admin token, API keys, registry URL) and the registry's libpq credentials (PG*)."""
    return name.startswith((ENV_PREFIX, "PG"))


def vllm_env(engine: EngineSettings, api_key: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not gateway_only(k)}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU builds; ignored on GPUs
    env.update(engine.env)  # the operator's explicit choice for vLLM
    env["LORA_GATEWAY_LORA_OPS"] = engine.lora_ops  # read by the engine plugin (engine_plugin/__init__.py)
    env["LORA_GATEWAY_LORA_COMPILE"] = "1" if engine.lora_compile else "0"  # the plugin's compiled.py
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # the gateway loads and unloads adapters at run time
    env.pop("VLLM_API_KEY", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key  # vLLM's --api-key: /v1/* answers 401 without it
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ManagedEngine(Engine):
    kind = "managed"

    def __init__(
        self,
        name: str,
        settings: EngineSettings,
        model: str,
        served_name: str,
        client: EngineClient,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(
            name,
            settings.base_url,
            client,
            probe_interval_s=settings.health_interval_s,
            unhealthy_after=settings.unhealthy_after,
            metrics=metrics,
        )
        self.settings = settings
        self.command = vllm_command(settings, model, served_name)
        self.process: asyncio.subprocess.Process | None = None
        self._relay: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.returncode is None else None

    async def _run(self) -> None:
        backoff = self.settings.restart_backoff_s
        first = True
        while not self._stopping:
            if not first:
                self.status.restarts += 1
            first = False
            self._set_state(EngineState.STARTING)
            await self._spawn()
            if await self._wait_for_first_answer():
                backoff = self.settings.restart_backoff_s
                await self._monitor()
            code = None if self.process is None else self.process.returncode
            died = code is not None
            if died:  # out of the rotation at once, not after the reaping (which waits for its log)
                self.mark_down(f"vLLM exited with code {code}")
            reason = await self._reap()
            if not died:
                self.mark_down(reason)
            if self._stopping:
                return
            log.warning("engine %s: %s; restarting in %.0f s", self.name, reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.settings.max_restart_backoff_s)

    async def _spawn(self) -> None:
        configured = self.settings.api_key
        key = configured.get_secret_value() if configured else secrets.token_urlsafe(32)
        self.client.authorize(self.base_url, key)
        log.info("engine %s: starting %s", self.name, " ".join(self.command))
        self.process = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=vllm_env(self.settings, key),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._relay = asyncio.create_task(self._relay_log(self.process), name=f"vllm-log-{self.name}")

    async def _relay_log(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        prefix = f"[vllm {self.name}]"
        while line := await process.stdout.readline():
            vllm_log.info("%s %s", prefix, line.decode("utf-8", "replace").rstrip())

    def _exited(self) -> bool:
        return self.process is None or self.process.returncode is not None

    async def _wait_for_first_answer(self) -> bool:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while time.monotonic() < deadline and not self._exited():
            if await self.probe_once():
                return True
            await asyncio.sleep(0.5)
        if not self._exited():
            self.status.last_error = f"not ready after {self.settings.startup_timeout_s:.0f} s"
        return False

    async def _monitor(self) -> None:
        assert self.process is not None
        wait_exit = asyncio.create_task(self.process.wait())
        try:
            while True:
                done, _ = await asyncio.wait({wait_exit}, timeout=self.probe_interval_s)
                if done:
                    return
                await self.probe_once()
        finally:
            wait_exit.cancel()

    async def _reap(self) -> str:
        """Make sure the process (group) is gone; return why it ended."""
        if self.process is None:
            return "not started"
        if self.process.returncode is None:
            reason = self.status.last_error or "stopped"
            await self._terminate()
        else:
            reason = f"vLLM exited with code {self.process.returncode}"
            self._kill_group(signal.SIGKILL)  # leftovers of the group (engine core workers)
        if self._relay is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._relay, timeout=2)
        return reason

    def _kill_group(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    async def _terminate(self) -> None:
        assert self.process is not None
        self._kill_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout=self.settings.stop_timeout_s)
        except TimeoutError:
            log.warning(
                "engine %s: no exit %s s after SIGTERM; killing", self.name, self.settings.stop_timeout_s
            )
            self._kill_group(signal.SIGKILL)
            await self.process.wait()
        self._kill_group(signal.SIGKILL)

    async def _shutdown(self) -> None:
        if self.process is not None and self.process.returncode is None:
            log.info("engine %s: stopping vLLM (pid %d)", self.name, self.process.pid)
            await self._terminate()
        if self._relay is not None:
            self._relay.cancel()
