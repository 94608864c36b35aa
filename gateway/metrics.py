"""Prometheus metrics, in the app's own registry, under our own prefix `lora_gateway_`.

Label values come only from known names: a `model` label is the base model's name or a registered
adapter's name; anything else a client sends is counted under `__unknown__`, so a flood of made-up
model names cannot create new time series. Buckets are vLLM's own, so dashboards line up.

Cost bounded whatever the number of adapters: counters and gauges have a series per registered adapter
(a few lines each), but histograms (about 25 lines a series) only for the base model and the
`metrics.histogram_models` busiest adapters; every other adapter's observations go to one `__other__`
series (`Metrics.detail`). With 1,000 adapters a scrape stays in the tens of thousands of lines instead of
over 100,000.
"""

from __future__ import annotations

import heapq
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

UNKNOWN = "__unknown__"
OTHER = "__other__"  # histogram observations of adapters outside the busiest `histogram_models`
NO_KEY = "-"  # the `key` label of requests made with no API key (open inference)

# vLLM's buckets (vllm/v1/metrics/loggers.py): end-to-end request latency and time to first token.
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
# Gateway-internal work (adapter loads, overhead) is much shorter than a generation.
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, histogram_models: int = 20, rank_every: int = 2000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Which models have histogram series of their own (see the module docstring).
        self.histogram_models = histogram_models
        self._rank_every = rank_every
        self._fixed: frozenset[str] = frozenset({UNKNOWN})  # always their own (set_fixed adds the base)
        self._detailed: set[str] = set()
        self._hits: dict[str, float] = {}
        self._observed = 0
        r = self.registry
        self.requests = Counter(
            "lora_gateway_requests",
            "Requests answered, by route, model and HTTP status.",
            ["route", "model", "status"],
            registry=r,
        )
        self.errors = Counter(
            "lora_gateway_request_errors",
            "Requests answered with an error, by route, model and error code.",
            ["route", "model", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "lora_gateway_request_duration_seconds",
            "End-to-end request latency seen by the gateway.",
            ["route", "model"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lora_gateway_time_to_first_token_seconds",
            "Time to the first streamed chunk.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        # Per adapter version, so a canary's versions can be compared: `model` is a registered name and
        # `version` one of its versions (bounded by what operators register).
        self.version_requests = Counter(
            "lora_gateway_version_requests",
            "Requests answered by adapter name, version and HTTP status.",
            ["model", "version", "status"],
            registry=r,
        )
        self.version_latency = Histogram(
            "lora_gateway_version_request_duration_seconds",
            "End-to-end request latency by adapter name and version, for requests a canary placed.",
            ["model", "version"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "lora_gateway_requests_in_flight", "Requests being answered now.", ["model"], registry=r
        )
        self.prompt_tokens = Counter(
            "lora_gateway_prompt_tokens", "Prompt tokens, as reported by the engine.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "lora_gateway_completion_tokens",
            "Completion tokens, as reported by the engine.",
            ["model"],
            registry=r,
        )
        self.engine_up = Gauge(
            "lora_gateway_engine_up",
            "1 while the engine is ready (set at each of its probes), else 0.",
            ["engine"],
            registry=r,
        )
        self.adapter_loads = Counter(
            "lora_gateway_adapter_loads",
            "Adapter loads into an engine, by result (ok or error).",
            ["adapter", "result"],
            registry=r,
        )
        self.adapter_load_duration = Histogram(
            "lora_gateway_adapter_load_duration_seconds",
            "Time to load an adapter into an engine.",
            ["adapter"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.adapter_evictions = Counter(
            "lora_gateway_adapter_evictions", "Adapters unloaded to make room.", ["adapter"], registry=r
        )
        self.adapter_wait = Histogram(
            "lora_gateway_adapter_wait_seconds",
            "Time a request for an adapter that was not ready to take it (not resident, or draining) waited "
            "before it went to the engine: for a free slot, a drain, the load.",
            ["adapter"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.adapter_drains = Counter(
            "lora_gateway_adapter_drains",
            "Busy adapters that stopped taking new requests so that a waiting load gets their slot.",
            ["adapter"],
            registry=r,
        )
        self.retries = Counter(
            "lora_gateway_retries",
            "Requests sent again before any byte reached the client: `engine_failed` (the replica refused or "
            "dropped the connection; another one took it), `adapter_lost` (vLLM no longer had the adapter).",
            ["reason"],
            registry=r,
        )
        # Per API key: the `key` label is a key's name (config or registry; `-` with no key), never a
        # secret; names are bounded by the operators who make keys, and made-up keys are refused before.
        self.key_requests = Counter(
            "lora_gateway_key_requests",
            "Requests by API key name and HTTP status.",
            ["key", "status"],
            registry=r,
        )
        self.key_tokens = Counter(
            "lora_gateway_key_tokens",
            "Tokens by API key name and kind (prompt, completion), as reported by the engine.",
            ["key", "kind"],
            registry=r,
        )
        self.key_rate_limited = Counter(
            "lora_gateway_key_rate_limited",
            "Requests refused with 429 by API key name and limit (requests_per_minute, tokens_per_minute, "
            "max_concurrent).",
            ["key", "limit"],
            registry=r,
        )
        self.resident_adapters = Gauge(
            "lora_gateway_resident_adapters", "Adapters loaded in an engine now.", ["engine"], registry=r
        )

        self._per_model = {
            id(m): m for m in (self.latency, self.ttft, self.adapter_load_duration, self.adapter_wait)
        }

    def set_fixed(self, names: set[str] | frozenset[str]) -> None:
        """Models that always have histogram series of their own (the base model)."""
        self._fixed = frozenset({UNKNOWN, *names})

    def detail(self, model: str, *, count: bool = True) -> str:
        """The label a histogram observation of `model` goes under: `model` itself while it is among the
        busiest `histogram_models` adapters (or fixed), else `__other__`. `count`: this is a request
        (ranks `model`); loads and waits ask without counting."""
        if model in self._fixed:
            return model
        if count:
            self._hits[model] = self._hits.get(model, 0.0) + 1.0
            self._observed += 1
            if self._observed >= self._rank_every:
                self._rank()
        detailed = self._detailed
        if model in detailed:
            return model
        if len(detailed) < self.histogram_models:
            detailed.add(model)
            return model
        return OTHER

    def _rank(self) -> None:
        """Keep the busiest adapters since the last rankings (counts halve each time: recent traffic weighs
        more); remove the histogram series of those that dropped out."""
        self._observed = 0
        hits = self._hits
        top = set(heapq.nlargest(self.histogram_models, hits, key=hits.__getitem__))
        for gone in self._detailed - top:
            self._forget(gone)
        self._detailed = top
        self._hits = {m: n / 2 for m, n in hits.items() if n >= 2}

    def _forget(self, model: str) -> None:
        for key in [k for k in self._children if k[0] in self._per_model and model in k[1]]:
            metric = self._per_model[key[0]]
            metric.remove(*key[1])
            del self._children[key]

    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, cached: the request path asks for the same few series every time,
        and prometheus-client takes a lock and builds a key on each `labels()` call."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)


def model_label(name: str | None, known: frozenset[str] | set[str]) -> str:
    return name if name is not None and name in known else UNKNOWN
