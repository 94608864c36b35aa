"""The demo adapters do their tasks through the gateway (issue 4, requirement 6), on held-out slices.

The full sets (100 requests each) are measured by the commands in docs/training.md.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from adapters.data import load_jsonl
from adapters.demo import DEMO_ADAPTERS
from adapters.demo_data import shipped_datasets_dir
from adapters.evaluate import evaluate_endpoint

pytestmark = pytest.mark.engine

SLICE = 25


def held_out(task: str):  # noqa: ANN201
    data = load_jsonl(shipped_datasets_dir() / task / "held_out.jsonl")
    return dataclasses.replace(data, rows=data.rows[:SLICE])


@pytest.mark.parametrize("model", ["tiny-llama", *(a.name for a in DEMO_ADAPTERS)])
def test_exact_match_through_the_gateway(model: str, gateway_url: str, tiny_cache: dict[str, Path]) -> None:
    for adapter in DEMO_ADAPTERS:
        result = evaluate_endpoint(gateway_url, model, held_out(adapter.task), max_tokens=32)
        if adapter.name == model:
            assert result.exact_match >= 0.9, f"{model} on its own task: {result.samples}"
        else:
            assert result.exact_match <= 0.1, f"{model} on {adapter.task}: {result.samples}"
