"""What one request did: the record shared by the runner, the stats and the files.

Times are seconds from ``time.perf_counter()``; ``start`` is relative to the start of the run
(the level), every other time is relative to the request's own ``start``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestResult:
    """One request's outcome.

    ``status`` is the HTTP status, or ``None`` when no response came (transport error, timeout,
    cancelled at the run's time limit); ``error`` then names the exception class first.
    ``ttft`` is the time to the first chunk with content, ``ttfb`` the time to the first SSE event
    of any kind (both streaming only; ``None`` otherwise).
    ``chunk_times`` are the arrival times of the content chunks (streaming only).
    ``usage_reported`` says whether ``completion_tokens`` came from the server's ``usage`` or was
    counted from content chunks. ``text`` is the generated text (first choice) and ``token_ids`` its
    tokens when vLLM sends them (``return_token_ids``), kept for ``--verify`` and left out of ``to_dict``.
    """

    index: int
    model: str
    tag: str = ""
    ok: bool = False
    status: int | None = None
    error: str | None = None
    error_kind: str | None = None
    start: float = 0.0
    scheduled: float | None = None
    ttfb: float | None = None
    ttft: float | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    usage_reported: bool = False
    text: str | None = None
    token_ids: list[int] | None = None

    @property
    def send_lag(self) -> float | None:
        """How late the request left compared with its open-loop schedule (generator health)."""
        if self.scheduled is None:
            return None
        return max(0.0, self.start - self.scheduled)

    def to_dict(self, *, digits: int = 6) -> dict[str, Any]:
        d = asdict(self)
        del d["text"], d["token_ids"]
        for key in ("start", "scheduled", "ttfb", "ttft", "e2e"):
            if d[key] is not None:
                d[key] = round(d[key], digits)
        d["chunk_times"] = [round(t, digits) for t in self.chunk_times]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestResult:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
