"""Fine-tune a LoRA adapter with PEFT + TRL, ready to register with the gateway.

The data format is detected from the JSONL file (see `adapters.data`): prompt/completion pairs or chat
`messages` for SFT, prompt/chosen/rejected triples for DPO.

# SFT on the embedded tiny base (built into the cache on first use)
```
lora-gateway train --base tiny-llama --data adapters/datasets/sql/train.jsonl --out out/sql \
    --epochs 2 --lr 2e-3 --batch-size 32 --eval adapters/datasets/sql/held_out.jsonl
```

# Any local folder or Hugging Face model id, options from a file (command-line values win)
```
lora-gateway train --config train.yaml --base Qwen/Qwen2.5-0.5B-Instruct --rank 16 \
    --target-modules q_proj v_proj --gradient-checkpointing
```

# DPO on preference triples, QLoRA (4-bit NF4 base; needs a CUDA GPU and bitsandbytes)
```
lora-gateway train --method dpo --qlora --base BASE --data prefs.jsonl --out out/dpo
```

# Register the result with a running gateway
```
lora-gateway train ... --out out/sql --register http://localhost:8000 --name sql --admin-token $TOKEN
```

`--out` receives `adapter_config.json` + `adapter_model.safetensors` (plain PEFT),
`training_report.json` and `loss.png`; everything is written into a temporary folder beside it and
moved into place only when training succeeded. Run `lora-gateway train --help` for every option.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from adapters.training import ALL_LINEAR, train_model, wrap_lora

__all__ = ["TrainOptions", "main", "parse_options", "train_model", "wrap_lora"]

METHODS = ("sft", "dpo")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class OptionsError(ValueError):
    """An option value that cannot work; the message names the option."""


def _opt(help: str, default: Any = MISSING, **extra: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainOptions:
    """Every option of `lora-gateway train`; field metadata is the `--help` text."""

    base: str | None = _opt(
        "Base model: a local folder, `tiny-llama` (the embedded base) or a Hugging Face id. Required.", None
    )
    data: Path | None = _opt(
        "Training data, JSONL (prompt/completion, chat messages, or prompt/chosen/rejected). Required.", None
    )
    out: Path | None = _opt(
        "Output folder for the adapter, training_report.json and loss.png. Required.", None
    )
    method: str = _opt("Training method.", "sft", choices=METHODS)
    rank: int = _opt("LoRA rank r.", 16)
    alpha: int = _opt("LoRA alpha (scale = alpha / rank).", 32)
    dropout: float = _opt("LoRA dropout (0 lets PEFT skip the op).", 0.0)
    target_modules: list[str] = _opt(
        "Modules to adapt: names (q_proj v_proj ...) or `all-linear`.", [ALL_LINEAR], nargs="+"
    )
    epochs: float = _opt("Training epochs (ignored when --max-steps > 0).", 3.0)
    max_steps: int = _opt("Stop after this many optimizer steps (-1: run the epochs).", -1)
    lr: float = _opt("Peak learning rate.", 2e-4)
    batch_size: int = _opt("Examples per device per micro-batch.", 8)
    grad_accum: int = _opt("Gradient accumulation steps.", 1)
    max_seq_len: int = _opt("Truncate sequences to this many tokens.", 1024)
    seed: int = _opt("Random seed (adapter init, data order).", 42)
    qlora: bool = _opt("Load the base in 4-bit NF4 with bitsandbytes (CUDA only).", False)
    gradient_checkpointing: bool = _opt("Recompute activations in backward to save memory.", False)
    checkpoint_fraction: float = _opt(
        "With --gradient-checkpointing: checkpoint this fraction of layers.", 1.0
    )
    liger: bool = _opt("Use Liger's fused layer kernels (needs liger-kernel, CUDA).", False)
    eval: Path | None = _opt("Held-out JSONL: eval loss while training, base vs adapter at the end.", None)
    eval_max_examples: int = _opt("Evaluate at most this many held-out examples (0: all).", 200)
    max_new_tokens: int = _opt("Greedy generation length for exact match.", 64)
    register: str | None = _opt("Gateway URL: POST the result to its /admin/adapters.", None)
    name: str | None = _opt("Adapter name for --register (default: the --out folder's name).", None)
    admin_token: str | None = _opt("Bearer token for --register (default: $LORA_GATEWAY_ADMIN_TOKEN).", None)
    base_name: str | None = _opt(
        "base_model_name_or_path written into adapter_config.json (default: the served name of the "
        "embedded base, else --base).",
        None,
    )
    dpo_beta: float = _opt("DPO beta.", 0.1)
    warmup_ratio: float = _opt("Fraction of steps for learning-rate warm-up.", 0.0)
    lr_scheduler: str = _opt("Learning-rate schedule (transformers name).", "linear")
    logging_steps: int = _opt("Log the loss every N steps.", 1)
    precision: str = _opt(
        "Training precision (auto: bf16 on a capable GPU, else fp32).", "auto", choices=PRECISIONS
    )
    overwrite: bool = _opt("Replace a non-empty --out.", False)

    def __post_init__(self) -> None:
        self._coerce_scalars()
        self.data = Path(self.data) if self.data else None
        self.out = Path(self.out) if self.out else None
        self.eval = Path(self.eval) if self.eval else None
        self.base = str(self.base) if self.base else None
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = [m for item in self.target_modules for m in str(item).split(",") if m]
        checks = [
            ("method", self.method in METHODS, f"must be one of {', '.join(METHODS)}"),
            ("precision", self.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
            ("rank", self.rank >= 1, "must be >= 1"),
            ("alpha", self.alpha > 0, "must be > 0"),
            ("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)"),
            ("epochs", self.epochs > 0 or self.max_steps > 0, "must be > 0 (or set --max-steps)"),
            ("lr", self.lr > 0, "must be > 0"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("max_seq_len", self.max_seq_len >= 8, "must be >= 8"),
            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "must be in [0, 1)"),
            ("checkpoint_fraction", 0.0 <= self.checkpoint_fraction <= 1.0, "must be in [0, 1]"),
            ("target_modules", bool(self.target_modules), "must name at least one module"),
            (
                "target_modules",
                ALL_LINEAR not in self.target_modules or self.target_modules == [ALL_LINEAR],
                f"`{ALL_LINEAR}` cannot be combined with module names",
            ),
        ]
        for name, ok, message in checks:
            if not ok:
                raise OptionsError(f"--{name.replace('_', '-')} {message} (got {getattr(self, name)!r})")

    def _coerce_scalars(self) -> None:
        """Config files give strings for some numbers (YAML reads `1e-3` as text): convert by field type."""
        for f in fields(self):
            default = f.default
            value = getattr(self, f.name)
            if isinstance(default, bool) and isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise OptionsError(f"--{f.name.replace('_', '-')} expects true or false (got {value!r})")
                setattr(self, f.name, value.lower() in ("true", "yes", "1"))
            elif isinstance(default, int | float) and not isinstance(default, bool) and value is not None:
                try:
                    setattr(self, f.name, type(default)(value))
                except (TypeError, ValueError):
                    kind = type(default).__name__
                    raise OptionsError(
                        f"--{f.name.replace('_', '-')} expects a number ({kind}), got {value!r}"
                    ) from None


# --------------------------------------------------------------------------- parsing


def build_parser(prog: str = "lora-gateway train") -> argparse.ArgumentParser:
    """argparse parser generated from `TrainOptions` (defaults suppressed so config files can fill in)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a LoRA adapter (PEFT + TRL).",
        epilog="Options may also come from --config FILE (YAML or TOML, same names); the command line wins.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, help="YAML or TOML file holding any of the options below.")
    for f in fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_text = meta.pop("help") + ("" if default is None else f" (default: {_show(default)})")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(type(default).__name__, str)
            if f.name in ("data", "out", "eval"):
                kind = Path
            parser.add_argument(flag, type=kind, help=help_text, **meta)
    return parser


def _show(value: Any) -> str:
    return " ".join(value) if isinstance(value, list) else str(value)


def load_config_file(path: Path) -> dict[str, Any]:
    """Options from a YAML or TOML file; keys may use dashes or underscores."""
    path = Path(path)
    if not path.is_file():
        raise OptionsError(f"--config {path}: no such file")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        raw = tomllib.loads(text)
    else:
        import yaml

        raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise OptionsError(f"--config {path}: expected a mapping of option names to values")
    known = {f.name for f in fields(TrainOptions)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise OptionsError(f"--config {path}: unknown option '{key}'")
        out[name] = value
    return out


def parse_options(argv: list[str] | None = None, prog: str = "lora-gateway train") -> TrainOptions:
    """Command line (and --config file) -> TrainOptions; exits with a usage message on errors."""
    parser = build_parser(prog)
    given = vars(parser.parse_args(argv))
    config = given.pop("config", None)
    try:
        merged = {**(load_config_file(config) if config else {}), **given}
        missing = [f"--{n}" for n in ("base", "data", "out") if not merged.get(n)]
        if missing:
            parser.error(f"{', '.join(missing)} required (on the command line or in --config)")
        return TrainOptions(**merged)
    except OptionsError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


# --------------------------------------------------------------------------- the run


def require_cuda_for_qlora(options: TrainOptions) -> None:
    """--qlora on a machine without CUDA stops here, before any model or data is loaded."""
    if not options.qlora:
        return
    import torch

    if not torch.cuda.is_available():
        raise OptionsError(
            "--qlora loads the base in 4-bit NF4 with bitsandbytes, which needs a CUDA GPU; none is "
            "available here. Drop --qlora to train a plain LoRA adapter."
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise OptionsError("--qlora needs the bitsandbytes package: pip install bitsandbytes")


def load_model(base_dir: Path, options: TrainOptions) -> tuple[Any, Any]:
    """(model, tokenizer) for training: full precision, or 4-bit NF4 with --qlora."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if torch.cuda.is_available():
        kwargs["dtype"] = torch.bfloat16 if options.precision in ("auto", "bf16") else torch.float32
    if options.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": 0}
    # No prepare_model_for_kbit_training: its fp32 upcasts cost speed and memory
    # (docs/training-benchmarks.md); the frozen base stays bf16 and only the adapter trains.
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    return model, tokenizer


def main(options: TrainOptions) -> Path:
    """Train, evaluate, write the adapter folder atomically, optionally register it. Returns `out`."""
    from adapters.artifacts import atomic_output, check_output, fingerprint_folder, resolve_base
    from adapters.data import load_jsonl, to_trl_rows
    from adapters.report import finish_adapter_folder, register_adapter, select_eval_rows
    from adapters.training import train_model, wrap_lora

    missing = [f"--{n}" for n in ("base", "data", "out") if not getattr(options, n)]
    if missing:
        raise OptionsError(f"{', '.join(missing)} required")
    assert options.base and options.data and options.out
    require_cuda_for_qlora(options)
    check_output(options.out, options.overwrite)
    train_data = load_jsonl(options.data)
    eval_data = load_jsonl(options.eval) if options.eval else None
    wanted = ("preference",) if options.method == "dpo" else ("prompt_completion", "chat")
    for ds in filter(None, (train_data, eval_data)):
        if ds.format not in wanted:
            raise OptionsError(
                f"--method {options.method} needs {' or '.join(wanted)} data; {ds.path} is {ds.format}"
            )
    print(f"data: {train_data.examples} examples, format {train_data.format} ({train_data.path})")
    base_dir = resolve_base(options.base)
    started = time.time()
    model, tokenizer = load_model(base_dir, options)
    peft_model = wrap_lora(model, options)
    eval_subset = select_eval_rows(eval_data, options.eval_max_examples) if eval_data else None
    summary = train_model(
        peft_model,
        tokenizer,
        to_trl_rows(train_data),
        options,
        eval_dataset=to_trl_rows(eval_subset) if eval_subset else None,
    )
    report: dict[str, Any] = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "base": {
            "name_or_path": options.base,
            "folder": str(base_dir.resolve()),
            "fingerprint": fingerprint_folder(base_dir),
        },
        "data": train_data.describe(),
        "eval_data": eval_data.describe() if eval_data else None,
        "options": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(options).items()
            if k != "admin_token"
        },
        "training": {k: v for k, v in summary.items() if k != "log_history"},
        "environment": _environment(),
    }
    if eval_subset:  # SFT: against the completions; DPO: against the chosen answers
        from adapters.evaluate import compare_base_adapter

        report["evaluation"] = compare_base_adapter(
            peft_model, tokenizer, eval_subset, max_new_tokens=options.max_new_tokens
        )
        _print_comparison(report["evaluation"])
    with atomic_output(options.out, overwrite=options.overwrite) as tmp:
        finish_adapter_folder(tmp, peft_model, summary["log_history"], report, base_dir, options)
    print(f"adapter written to {options.out}")
    if options.register:
        name = options.name or options.out.resolve().name
        token = options.admin_token or os.environ.get("LORA_GATEWAY_ADMIN_TOKEN")
        answer = register_adapter(options.register, name, options.out, token)
        print(f"registered {name!r} with {options.register}: {json.dumps(answer)[:200]}")
    return options.out


def _print_comparison(evaluation: dict[str, dict[str, Any]]) -> None:
    print(f"{'held-out':<14}{'loss':>8}{'ppl':>10}{'exact':>8}{'tokF1':>8}")
    for who, scores in evaluation.items():
        em, f1 = scores.get("exact_match"), scores.get("token_f1")
        print(
            f"{who:<14}{scores['loss']:>8.3f}{scores['perplexity']:>10.2f}"
            f"{'' if em is None else f'{em:.1%}':>8}{'' if f1 is None else f'{f1:.3f}':>8}"
        )


def _environment() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "device": device,
    }


def cli(argv: list[str] | None = None, prog: str = "lora-gateway train") -> int:
    """Parse, run, and turn expected failures into a one-line message and exit status."""
    from adapters.data import DatasetError
    from adapters.report import RegisterError

    options = parse_options(argv, prog)
    try:
        main(options)
    except (OptionsError, DatasetError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RegisterError as exc:
        print(f"error: the adapter was written to {options.out} but not registered: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(prog="python -m adapters.train"))
