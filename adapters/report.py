"""What a training run leaves behind, and how it is handed to a gateway.

`finish_adapter_folder` writes the plain PEFT adapter (`adapter_config.json` with
`base_model_name_or_path` set, `adapter_model.safetensors`), `training_report.json` and `loss.png`
into a (temporary) folder; `register_adapter` POSTs the finished folder to a gateway's
`/admin/adapters` route.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from adapters.artifacts import fingerprint_folder, is_embedded_base
from adapters.data import JsonlDataset


class RegisterError(RuntimeError):
    """The gateway refused or could not be reached."""


def select_eval_rows(dataset: JsonlDataset, limit: int) -> JsonlDataset:
    """The first `limit` examples (all when limit <= 0): evaluation by generation is the slow part."""
    if limit <= 0 or dataset.examples <= limit:
        return dataset
    return dataclasses.replace(dataset, rows=dataset.rows[:limit])


def served_base_name(base: str, base_dir: Path, override: str | None) -> str:
    """The base name vLLM knows: explicit override, the embedded base's served name, else `base` as given."""
    if override:
        return override
    if is_embedded_base(base_dir):
        from adapters.tiny import TINY_NAME

        return TINY_NAME
    return base


def finish_adapter_folder(
    folder: Path,
    peft_model: Any,
    history: list[dict[str, Any]],
    report: dict[str, Any],
    base_dir: Path,
    options: Any,
) -> None:
    """Save adapter + report + loss curve into `folder`."""
    from adapters.training import loss_curves, plot_loss

    peft_model.save_pretrained(folder, safe_serialization=True)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = served_base_name(options.base, base_dir, options.base_name)
    config["inference_mode"] = True
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    curves = loss_curves(history)
    report = {
        **report,
        "adapter": {
            "base_model_name_or_path": config["base_model_name_or_path"],
            "peft_type": config.get("peft_type"),
            "r": config.get("r"),
            "lora_alpha": config.get("lora_alpha"),
            "target_modules": sorted(config.get("target_modules") or []),
            "fingerprint": fingerprint_folder(folder),
        },
        "loss": curves,
    }
    (folder / "training_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot_loss(curves, folder / "loss.png", title=f"{options.method} on {Path(options.data).name}")


def register_adapter(url: str, name: str, folder: Path, token: str | None, timeout: float = 60.0) -> Any:
    """Register the finished folder with the gateway at `url` (`gateway.admin_client.register_folder`: by
    path to a gateway on this machine that can read it, else uploaded); return the JSON answer."""
    import httpx

    from gateway.admin_client import AdminError, register_folder

    base = url.rstrip("/").removesuffix("/admin/adapters")
    try:
        return register_folder(
            base, token, name, folder, timeout=httpx.Timeout(timeout, read=max(timeout, 600.0))
        )
    except AdminError as exc:
        raise RegisterError(exc.describe()) from exc
