"""`lora-gateway train`: options, output folder and report, DPO, QLoRA refusal, atomicity, checkpointing."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from adapters.llama import LINEAR_MODULES
from adapters.train import OptionsError, TrainOptions, main, parse_options


@pytest.fixture(scope="session")
def tiny_base(cache_dir: Path) -> Path:
    from adapters.tiny import build_tiny

    return build_tiny(cache_dir)


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small slices of the demo datasets: 48 SQL chat examples, 6 held out, 16 preference triples."""
    from adapters.demo_data import chat_row, preference_rows, split_requests, write_jsonl

    folder = tmp_path_factory.mktemp("data")
    splits = split_requests(train=48, held_out=6)
    return {
        "train": write_jsonl(folder / "train.jsonl", [chat_row(r, "sql") for r in splits["train"]]),
        "held_out": write_jsonl(folder / "held_out.jsonl", [chat_row(r, "sql") for r in splits["held_out"]]),
        "prefs": write_jsonl(folder / "prefs.jsonl", preference_rows(splits["train"][:16])),
    }


def quick(tiny_base: Path, data: Path, out: Path, **extra: object) -> TrainOptions:
    values: dict[str, object] = {
        "base": str(tiny_base),
        "data": data,
        "out": out,
        "max_steps": 3,
        "batch_size": 8,
        "lr": 1e-3,
        "rank": 8,
        "alpha": 16,
        "eval_max_examples": 4,
        "max_new_tokens": 12,
        **extra,
    }
    return TrainOptions(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- options


def test_importing_the_cli_stays_light() -> None:
    code = (
        "import sys, adapters.cli, adapters.train, gateway.cli, gateway.app; "
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", ["adapters.cli", "gateway.cli"])
def test_cli_mounts_train_merge_evaluate(module: str) -> None:
    import importlib

    from typer.testing import CliRunner

    app = importlib.import_module(module).app

    runner = CliRunner()
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for flag in ("--rank", "--alpha", "--target-modules", "--qlora", "--gradient-checkpointing", "--config"):
        assert flag in result.output
    assert "LoRA rank r." in result.output, "help text comes from the options dataclass"
    for command in ("merge", "evaluate", "build-demo"):
        assert runner.invoke(app, [command, "--help"]).exit_code == 0


def test_config_file_and_command_line(tmp_path: Path) -> None:
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text(
        "base: some/model\ndata: d.jsonl\nout: o\nrank: 4\nlr: 1e-2\ntarget-modules: [q_proj, v_proj]\n"
    )
    options = parse_options(["--config", str(yaml_file), "--rank", "8", "--qlora"])
    assert options.rank == 8, "the command line wins"
    assert options.lr == 0.01 and options.target_modules == ["q_proj", "v_proj"] and options.qlora
    assert options.data == Path("d.jsonl")

    toml_file = tmp_path / "train.toml"
    toml_file.write_text('base = "b"\ndata = "d.jsonl"\nout = "o"\nmethod = "dpo"\nepochs = 2\n')
    options = parse_options(["--config", str(toml_file), "--target-modules", "q_proj,k_proj"])
    assert options.method == "dpo" and options.epochs == 2 and options.target_modules == ["q_proj", "k_proj"]
    assert parse_options(["--base", "b", "--data", "d", "--out", "o"]).target_modules == ["all-linear"]

    (tmp_path / "bad.yaml").write_text("rnak: 4\n")
    with pytest.raises(OptionsError, match="unknown option 'rnak'"):
        from adapters.train import load_config_file

        load_config_file(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "d", "--out", "o"], "--base required"),
        (["--base", "b", "--data", "d", "--out", "o", "--rank", "0"], "--rank must be >= 1"),
        (["--base", "b", "--data", "d", "--out", "o", "--method", "ppo"], "invalid choice"),
        (
            ["--base", "b", "--data", "d", "--out", "o", "--target-modules", "all-linear", "q_proj"],
            "cannot be combined",
        ),
    ],
)
def test_bad_options_exit_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_options(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_qlora_without_cuda_stops_before_loading_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import adapters.artifacts
    import adapters.data

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may be loaded before the --qlora check")

    monkeypatch.setattr(adapters.data, "load_jsonl", boom)
    monkeypatch.setattr(adapters.artifacts, "resolve_base", boom)
    with pytest.raises(OptionsError, match="needs a CUDA GPU"):
        main(TrainOptions(base="tiny-llama", data=tmp_path / "x.jsonl", out=tmp_path / "out", qlora=True))
    assert not (tmp_path / "out").exists()

    from adapters.train import cli

    code = cli(["--base", "nowhere", "--data", "x.jsonl", "--out", str(tmp_path / "o"), "--qlora"])
    assert code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_bad_data_stops_before_training(tiny_base: Path, tmp_path: Path, demo_files: dict[str, Path]) -> None:
    from adapters.data import DatasetError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: missing field 'completion'"):
        main(quick(tiny_base, bad, tmp_path / "out"))
    with pytest.raises(OptionsError, match="needs preference data"):
        main(quick(tiny_base, demo_files["train"], tmp_path / "out", method="dpo"))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- training runs


class _Recorder(BaseHTTPRequestHandler):
    calls: list[tuple[str, dict, str | None]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append((self.path, body, self.headers.get("Authorization")))
        payload = json.dumps({"name": body["name"], "version": 1}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_gateway() -> tuple[str, list]:
    _Recorder.calls = []
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _Recorder.calls
    server.shutdown()
    server.server_close()


@pytest.mark.train
def test_sft_writes_a_plain_peft_adapter_with_report(
    tiny_base: Path, demo_files: dict[str, Path], tmp_path: Path, fake_gateway: tuple[str, list]
) -> None:
    from adapters.validate import BaseModelSpec, validate_adapter_dir

    url, calls = fake_gateway
    out = tmp_path / "sql"
    options = quick(
        tiny_base,
        demo_files["train"],
        out,
        eval=demo_files["held_out"],
        register=url,
        name="sql",
        admin_token="t0k",
    )
    assert main(options) == out
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training_report.json", "loss.png"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA"
        and config["r"] == 8
        and config["base_model_name_or_path"] == "tiny-llama"
    )
    assert not config.get("modules_to_save") and not config.get("use_dora")
    spec = BaseModelSpec.from_model_dir(tiny_base, "tiny-llama")
    info = validate_adapter_dir(out, spec, max_rank=16, max_bytes=64 << 20)
    assert set(info.target_modules) == set(LINEAR_MODULES)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((out / "training_report.json").read_text())
    assert report["base"]["fingerprint"].startswith("sha256:")
    assert report["data"]["format"] == "chat" and report["data"]["examples"] == 48
    assert len(report["data"]["sha256"]) == 64 and report["eval_data"]["examples"] == 6
    assert report["options"]["rank"] == 8 and report["options"]["max_steps"] == 3
    assert "admin_token" not in report["options"]
    training = report["training"]
    assert training["steps"] == 3 and training["tokens"] > 0 and training["tokens_per_s"] > 0
    assert training["peak_memory"]["bytes"] > 0 and training["wall_time_s"] > 0
    assert [p["step"] for p in report["loss"]["train"]][:2] == [1, 2] and report["loss"]["eval"]
    evaluation = report["evaluation"]
    for who in ("base", "adapter"):
        assert evaluation[who]["examples"] == 4 and evaluation[who]["loss"] > 0
        assert evaluation[who]["exact_match"] is not None and evaluation[who]["token_f1"] is not None
    assert evaluation["base"]["loss"] != evaluation["adapter"]["loss"]

    source = str(out.resolve())
    registered = {"name": "sql", "description": "", "pin": False, "force": False, "source": source}
    assert calls == [("/admin/adapters", registered, "Bearer t0k")]  # by path: the gateway is on loopback


@pytest.mark.train
def test_dpo_runs_a_few_steps(tiny_base: Path, demo_files: dict[str, Path], tmp_path: Path) -> None:
    prefs = demo_files["prefs"]
    options = quick(tiny_base, prefs, tmp_path / "dpo", method="dpo", max_steps=2, batch_size=4, eval=prefs)
    out = main(options)
    report = json.loads((out / "training_report.json").read_text())
    assert report["data"]["format"] == "preference" and report["training"]["steps"] == 2
    assert report["loss"]["train"] and report["evaluation"]["adapter"]["examples"] == 4
    assert report["evaluation"]["base"]["loss"] != report["evaluation"]["adapter"]["loss"]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.train
def test_a_failure_leaves_nothing_half_written(
    tiny_base: Path, demo_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adapters.training

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full while plotting")

    monkeypatch.setattr(adapters.training, "plot_loss", fail)  # after the adapter files are written
    out = tmp_path / "never"
    with pytest.raises(RuntimeError, match="disk full"):
        main(quick(tiny_base, demo_files["train"], out, max_steps=1))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "no temporary folder is left behind"

    out.mkdir()
    (out / "old.txt").write_text("previous run")
    with pytest.raises(FileExistsError, match="not empty"):
        main(quick(tiny_base, demo_files["train"], out, max_steps=1))
    with pytest.raises(RuntimeError):
        main(quick(tiny_base, demo_files["train"], out, max_steps=1, overwrite=True))
    assert (out / "old.txt").read_text() == "previous run", "a failed --overwrite keeps the old folder"


def _count_layer_calls(model: object) -> list[int]:
    from adapters.training import decoder_layers

    # Pre-hooks: the recomputation in backward stops early (torch's non-reentrant checkpoint), before a
    # forward post-hook would run.
    counts = [0] * len(decoder_layers(model))
    for i, layer in enumerate(decoder_layers(model)):
        layer.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.train
@pytest.mark.parametrize(
    ("checkpointing", "fraction", "expected"),
    [(False, 1.0, [1, 1]), (True, 1.0, [2, 2]), (True, 0.5, [2, 1])],
)
def test_gradient_checkpointing_really_runs(
    tiny_base: Path, checkpointing: bool, fraction: float, expected: list[int]
) -> None:
    """A from_pretrained model starts in eval mode; checkpointed layers must run forward twice a step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.train import train_model

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert not model.training
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    counts = _count_layer_calls(model)
    rows = [{"input_ids": list(range(10, 42))} for _ in range(4)]
    options = TrainOptions(
        max_steps=1, batch_size=4, gradient_checkpointing=checkpointing, checkpoint_fraction=fraction
    )
    report = train_model(model, tokenizer, rows, options)
    assert report["steps"] == 1 and report["trainable_params"] > 0
    assert counts == expected
    assert model.is_gradient_checkpointing is checkpointing


@pytest.mark.train
def test_pretokenized_rows_need_no_tokenizer(tiny_base: Path) -> None:
    """The GPU benchmark's call: a model built in memory, pre-tokenized rows, tokenizer None."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_base))
    options = TrainOptions(max_steps=2, batch_size=2, target_modules="all-linear", rank=4, alpha=8)
    report = train_model_call(model, options)
    assert report["steps"] == 2 and report["tokens"] == 2 * 2 * 16
    assert 0 < report["trainable_params"] < report["total_params"]


def train_model_call(model: object, options: TrainOptions) -> dict:
    from adapters.train import train_model

    return train_model(model, None, [{"input_ids": list(range(5, 21))} for _ in range(8)], options)
