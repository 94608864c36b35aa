"""Metrics under the names the field uses (``vllm bench serve``, GuideLLM). Pure functions.

- request throughput        completed requests / duration (req/s)
- output token throughput   completion tokens of completed requests / duration (tok/s)
- TTFT   time to first token: request start to the first chunk with content (streaming)
- TPOT   time per output token, first token excluded: (e2e - ttft) / (completion_tokens - 1)
- ITL    inter-token latency: gaps between successive content chunks (streaming)
- e2e    end-to-end latency: request start to the last byte

Latency distributions are reported in milliseconds with ``mean``, ``p50``, ``p90``, ``p99``
(plus ``count``, ``min``, ``max``); percentiles interpolate linearly like ``numpy.percentile``.
Only completed (successful) requests enter the latency and throughput figures; failures are
counted by kind (HTTP status as a string, ``stream_error``, or the transport exception's name).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from loadtest.harness.records import RequestResult

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` with linear interpolation; NaN if empty."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"q: must be within 0..100, got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Iterable[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """``count``, ``mean``, ``p50``, ``p90``, ``p99``, ``min``, ``max`` of ``values * scale``.

    Empty input gives ``count`` 0 and ``None`` elsewhere (JSON-friendly).
    """
    xs = sorted(v * scale for v in values)
    if not xs:
        return {"count": 0, "mean": None, **{f"p{q}": None for q in PERCENTILES}, "min": None, "max": None}
    out: dict[str, float | int | None] = {"count": len(xs), "mean": sum(xs) / len(xs)}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(xs, q)
    out["min"] = xs[0]
    out["max"] = xs[-1]
    return out


def tpot(r: RequestResult) -> float | None:
    """Time per output token after the first: ``(e2e - ttft) / (completion_tokens - 1)``."""
    if r.ttft is None or r.e2e is None or not r.completion_tokens or r.completion_tokens < 2:
        return None
    return (r.e2e - r.ttft) / (r.completion_tokens - 1)


def itls(r: RequestResult) -> list[float]:
    """Gaps between successive content chunks (the first chunk is TTFT, not an ITL)."""
    t = r.chunk_times
    return [b - a for a, b in zip(t, t[1:], strict=False)]


def error_counts(results: Iterable[RequestResult]) -> dict[str, int]:
    """Failed requests counted by kind, most frequent first."""
    c = Counter(r.error_kind or "unknown" for r in results if not r.ok)
    return dict(c.most_common())


def duration_of(results: Sequence[RequestResult]) -> float:
    """Wall time from the first request's start to the last one's end (0 if none ended)."""
    ends = [r.start + r.e2e for r in results if r.e2e is not None]
    if not ends:
        return 0.0
    return max(ends) - min(r.start for r in results)


def summarize(
    results: Sequence[RequestResult],
    *,
    duration_s: float | None = None,
    requested: int | None = None,
) -> dict[str, Any]:
    """The summary of one level (or one slice of it).

    ``duration_s`` defaults to :func:`duration_of`; ``requested`` (how many the workload held)
    defaults to ``len(results)``, the difference being requests never sent before the time limit.
    """
    ok = [r for r in results if r.ok]
    duration = duration_of(results) if duration_s is None else duration_s
    requested = len(results) if requested is None else requested
    out_tokens = sum(r.completion_tokens or 0 for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    ms = 1000.0
    lags = [lag for r in results if (lag := r.send_lag) is not None]
    return {
        "requests": {
            "requested": requested,
            "sent": len(results),
            "completed": len(ok),
            "failed": len(results) - len(ok),
            "not_sent": requested - len(results),
        },
        "duration_s": duration,
        "request_throughput": per_s(len(ok)),
        "output_token_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(out_tokens + in_tokens),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "usage_reported": sum(r.usage_reported for r in ok),
        "mean_concurrency": per_s(sum(r.e2e or 0.0 for r in ok)),
        "ttft_ms": distribution((r.ttft for r in ok if r.ttft is not None), ms),
        "ttfb_ms": distribution((r.ttfb for r in ok if r.ttfb is not None), ms),
        "tpot_ms": distribution((t for r in ok if (t := tpot(r)) is not None), ms),
        "itl_ms": distribution((g for r in ok for g in itls(r)), ms),
        "e2e_ms": distribution((r.e2e for r in ok if r.e2e is not None), ms),
        "send_lag_ms": distribution(lags, ms),
        "errors": error_counts(results),
    }


def per_model(results: Sequence[RequestResult], *, duration_s: float | None = None) -> dict[str, Any]:
    """:func:`summarize` for each model, over the whole level's duration (so throughputs add up)."""
    duration = duration_of(results) if duration_s is None else duration_s
    groups: dict[str, list[RequestResult]] = {}
    for r in results:
        groups.setdefault(r.model, []).append(r)
    return {m: summarize(rs, duration_s=duration) for m, rs in sorted(groups.items())}


def by_tag(results: Sequence[RequestResult]) -> dict[str, list[RequestResult]]:
    groups: dict[str, list[RequestResult]] = {}
    for r in results:
        groups.setdefault(r.tag, []).append(r)
    return groups
