"""What the load-test commands share on the command line: comma-separated lists, and the base model and
adapters options of the commands that start their own servers (compare, thrash, routing, benchmark).

Typer only at import; what resolving the options needs (settings, the embedded model, random adapters)
is imported when they are resolved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def floats(text: str, option: str) -> list[float]:
    """Comma-separated positive numbers; whole numbers come back as ints (levels read as 1, not 1.0)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated numbers, got {text!r}", param_hint=option
        ) from None
    if not values or any(v <= 0 for v in values):
        raise typer.BadParameter(f"expected positive numbers, got {text!r}", param_hint=option)
    return [int(v) if v.is_integer() else v for v in values]


def ints(text: str, option: str) -> list[int]:
    """Comma-separated integers >= 1 (concurrency levels)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint=option
        ) from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"expected integers >= 1, got {text!r}", param_hint=option)
    return values


def ms(d: dict[str, Any], stat: str) -> str:
    """A statistic of a latency distribution, for a progress line: two decimals, "-" when there is none."""
    v = d.get(stat)
    return "-" if v is None else f"{v:.2f}"


def base_and_adapters(
    base: str, adapters: str | None, random_adapters: int | None, workdir: Path | None
) -> tuple[Path, str, list[Path]]:
    """The base folder, its served name and the adapter folders (``tiny``: the embedded base)."""
    from gateway.settings import Settings

    cache = Settings().cache_dir
    if base == "tiny":
        from adapters.tiny import TINY_NAME, build_tiny

        base_dir, base_name = build_tiny(cache), TINY_NAME
    else:
        base_dir = Path(base).expanduser().absolute()
        if not (base_dir / "config.json").is_file():
            raise typer.BadParameter(f"not a model folder (no config.json): {base}", param_hint="--base")
        base_name = base_dir.name
    if (adapters is None) == (random_adapters is None):
        raise typer.BadParameter("give --adapters or --random-adapters", param_hint="--adapters")
    if adapters is not None:
        paths = [Path(a.strip()).expanduser().absolute() for a in adapters.split(",") if a.strip()]
        for a in paths:
            if not (a / "adapter_config.json").is_file():
                raise typer.BadParameter(f"not a PEFT folder: {a}", param_hint="--adapters")
        return base_dir, base_name, paths
    from loadtest.harness.scenario import random_adapters as make

    where = (workdir or cache / "loadtest-adapters") / f"random-for-{base_name}"
    return base_dir, base_name, make(base_dir, base_name, int(random_adapters or 0), where)


BaseOpt = Annotated[str, typer.Option(help="Base model folder, or 'tiny' for the embedded one.")]
AdaptersOpt = Annotated[str | None, typer.Option(help="Comma-separated PEFT adapter folders.")]
RandomOpt = Annotated[
    int | None,
    typer.Option(min=1, help="Instead of --adapters: N random adapters for the base (adapters/demo.py)."),
]
ConcOpt = Annotated[str, typer.Option(help="Closed-loop concurrency levels.")]
EngineThrashOpt = Annotated[
    bool,
    typer.Option(
        help="Also the same adapters over a vLLM that keeps only thrash-resident of them (--max-loras and "
        "--max-cpu-loras), all registered: vLLM swaps them through its slots and reads evicted ones back "
        "from disk itself (starts one more vLLM)."
    ),
]
RepeatOpt = Annotated[
    int,
    typer.Option(min=1, help="Measure each level this many times and pool the requests (p99 over all)."),
]
VllmArgOpt = Annotated[
    list[str] | None, typer.Option(help="Extra vLLM argument, repeatable (--vllm-arg=--dtype=bfloat16).")
]


VerifyOpt = Annotated[
    bool,
    typer.Option(
        help="Check every answer against its model's own answer to that request sent alone to the same "
        "server (greedy): wrong answers per level, mode and model in results.json and report.md."
    ),
]
