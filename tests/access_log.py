"""The gateway's access log lines (gateway/tenancy/access.py), caught in the test process: in-process gateways
write them to the `lora_gateway.access` logger, which does not propagate (pytest's caplog would miss them)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.tenancy.access import LOGGER


class Lines(logging.Handler):
    """Every access log line, decoded."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture
def access_lines() -> Iterator[list[dict[str, Any]]]:
    handler = Lines()
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
