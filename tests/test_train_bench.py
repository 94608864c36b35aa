"""The GPU training benchmark's CPU-side parts: shapes, counts, FLOPs arithmetic, report, a tiny run.

The benchmark itself runs on a GPU (docs/training-benchmarks.md); here: the Llama-3 shapes and
their parameter counts, the MFU arithmetic, the chunked loss against transformers' own, the report
file, and a 2-step run of each CPU-capable recipe on a tiny model, checking that gradient
checkpointing really ran (every checkpointed layer runs forward twice a step).
"""

from __future__ import annotations

import json

import pytest

from adapters.bench import run as train_bench
from adapters.bench.measure import (
    H200_BF16_DENSE_FLOPS,
    executed_flops_per_token,
    model_flops_per_token,
    run_case,
    utilisation,
)
from adapters.bench.model import arch_dims, lora_param_count, param_counts
from adapters.bench.recipes import Case
from adapters.llama import LINEAR_MODULES

torch = pytest.importorskip("torch")
pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_param_counts_match_the_published_models():
    assert param_counts(arch_dims("llama3-8b"))["total"] == 8_030_261_248
    assert param_counts(arch_dims("llama3-70b"))["total"] == 70_553_706_496
    # Checked against transformers on the meta device: no memory, same count.
    from transformers import LlamaForCausalLM

    from adapters.bench.model import llama_config

    for arch in ("llama3-8b", "tiny"):
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config(arch))
        assert model.num_parameters() == param_counts(arch_dims(arch))["total"]


def test_lora_sizes_and_fewer_layers():
    dims = arch_dims("llama3-8b")
    assert lora_param_count(dims, LINEAR_MODULES, 16) == 41_943_040
    assert lora_param_count(dims, ("q_proj", "v_proj"), 16) == 6_815_744
    assert arch_dims("llama3-70b", num_layers=4)["num_hidden_layers"] == 4
    with pytest.raises(ValueError, match="arch"):
        arch_dims("llama3-13b")
    with pytest.raises(ValueError, match="targets"):
        lora_param_count(dims, ("lm_head",), 16)


def test_mfu_arithmetic():
    dims = arch_dims("llama3-8b")
    assert model_flops_per_token(dims) == 6 * 8_030_261_248
    # 10,000 tokens/s on Llama-3-8B is 48.7% MFU of an H200's 989 TFLOP/s.
    assert utilisation(model_flops_per_token(dims), 10_000) == pytest.approx(0.4872, abs=1e-4)
    assert H200_BF16_DENSE_FLOPS == 989e12
    ckpt = executed_flops_per_token(dims, Case("llama3-8b", "lora", "levers", 2048, 1, 1.0))
    none = executed_flops_per_token(dims, Case("llama3-8b", "lora", "levers", 2048, 1, 0.0))
    layers_mm = 32 * param_counts(dims)["linear_per_layer"]
    attention = 32 * 2 * 2048 * 4096
    assert ckpt - none == 2 * layers_mm + attention  # one more forward of every layer
    assert none > 4 * layers_mm  # forward + input gradients, plus head, attention, adapter


def test_case_checks_and_names():
    case = Case("llama3-8b", "qlora", "levers", 2048, 4, 0.75, "qv", liger=True)
    assert case.name == "llama3-8b-qlora-qv-levers-liger-s2048-mb4-ckpt0.75"
    with pytest.raises(ValueError, match="checkpointing"):
        Case("llama3-8b", "lora", "baseline", 2048, 1, 0.5)
    with pytest.raises(ValueError, match="method"):
        Case("llama3-8b", "full", "levers", 2048, 1, 1.0)
    with pytest.raises(ValueError, match="liger"):
        Case("llama3-8b", "lora", "baseline", 2048, 1, 1.0, liger=True)


def test_suite_selection_and_cli_case():
    args = train_bench.parse_args(
        ["--suite", "h200", "--select", "qlora+s2048", "--skip", "ours", "--out", "x"]
    )
    names = [c.name for c in train_bench.cases_from_args(args)]
    assert names and all("qlora" in n and "s2048" in n and "ours" not in n for n in names)
    args = train_bench.parse_args(
        [
            "--arch",
            "llama3-8b",
            "--recipe",
            "baseline,levers",
            "--no-checkpointing",
            "--seq",
            "512",
            "--out",
            "x",
        ]
    )
    cases = train_bench.cases_from_args(args)
    assert [(c.recipe, c.checkpointing, c.seq) for c in cases] == [
        ("baseline", 0.0, 512),
        ("levers", 0.0, 512),
    ]
    # --liger reaches our train path and the levers, never the textbook baseline.
    args = train_bench.parse_args(["--recipe", "baseline,ours,levers", "--liger", "--out", "x"])
    cases = train_bench.cases_from_args(args)
    assert [(c.recipe, c.liger) for c in cases] == [("baseline", False), ("ours", True), ("levers", True)]


def test_chunked_loss_matches_transformers_loss():
    from adapters.bench.loss import chunked_lm_loss

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 33, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 33), generator=gen)
    labels[0, :7] = -100
    loss = chunked_lm_loss(hidden[:, :-1], weight, labels[:, 1:], chunk=8)
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    logits = ref_hidden[:, :-1] @ weight.t()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1))
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(hidden.grad, ref_hidden.grad, rtol=1e-4, atol=1e-7)


def test_report_accumulates_and_is_rewritten_whole(tmp_path):
    path = tmp_path / "r.json"
    report = train_bench.load_report(path)
    report["results"].append({"name": "a", "status": "ok"})
    train_bench.write_report(path, report)
    again = train_bench.load_report(path)
    assert [r["name"] for r in again["results"]] == ["a"]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(("recipe", "ckpt"), [("baseline", 1.0), ("levers", 0.5)])
def test_two_steps_on_the_tiny_model_with_real_checkpointing(recipe, ckpt):
    record = run_case(Case("tiny", "lora", recipe, 32, 2, ckpt), "cpu", warmup=1, steps=2)
    assert record["status"] == "ok", record.get("error")
    assert record["tokens_per_s"] > 0 and len(record["step_s"]) == 2
    assert record["trainable_params"] == lora_param_count(arch_dims("tiny"), LINEAR_MODULES, 16)
    # tiny has 2 layers: all checkpointed -> 4 forward calls a step; half -> 3.
    assert record["layer_calls_per_step"] == 2 + round(2 * ckpt)
    assert record["checkpointing_active"] is True
    assert record["peak_allocated_gib"] is None  # no CUDA here


def test_eval_mode_shows_checkpointing_inactive():
    """The pitfall of the issue: a model in eval mode skips checkpointing; the counter sees it."""
    from adapters.bench.measure import build_model
    from adapters.bench.recipes import count_layer_calls

    case = Case("tiny", "lora", "levers", 16, 1, 1.0)
    model = build_model(case, "cpu")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = count_layer_calls(model)
    batch = torch.randint(0, 1024, (1, 16))
    model.train()
    model(input_ids=batch, labels=batch).loss.backward()
    assert calls[0] == 4
    calls[0] = 0
    model.eval()
    model.model.embed_tokens.weight.requires_grad_(True)
    model(input_ids=batch, labels=batch).loss.backward()
    assert calls[0] == 2


def test_main_writes_the_report(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--arch", "tiny", "--device", "cpu", "--recipe", "levers", "--seq", "16"]
    rc = train_bench.main([*argv, "--steps", "1", "--warmup", "0", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["environment"]["torch"] == torch.__version__
    (record,) = report["results"]
    assert record["recipe"] == "levers" and record["status"] == "ok"
    assert "levers" in capsys.readouterr().out


def test_missing_train_path_is_reported_not_crashed_on(monkeypatch):
    from adapters.bench import ours as train_bench_ours

    monkeypatch.setattr(train_bench_ours, "unavailable", lambda: "no adapters.train here")
    record = run_case(Case("tiny", "lora", "ours", 16, 1, 1.0), "cpu", warmup=0, steps=1)
    assert record["status"] == "unavailable" and record["error"] == "no adapters.train here"


def test_report_table_says_which_cards_fit():
    from adapters.bench.report import fits, table

    record = {
        "name": "x",
        "status": "ok",
        "arch": "llama3-70b",
        "method": "qlora",
        "recipe": "levers",
        "targets": "all-linear",
        "liger": True,
        "seq": 2048,
        "micro_batch": 1,
        "checkpointing": 1.0,
        "tokens_per_s": 1131.2,
        "mfu": 0.484,
        "peak_allocated_gib": 43.0,
        "peak_reserved_gib": 44.3,
    }
    assert [fits(record, c) for c in (24, 40, 48, 80)] == ["no", "no", "yes", "yes"]
    assert fits({**record, "peak_reserved_gib": 47.5}, 48) == "~"  # allocated fits, reserved not
    text = table([record, {"name": "y", "status": "oom"}])
    assert (
        "| 70B QLoRA NF4, ckpt, levers+liger | 2048 | 1 | 1,131 | 48.4% | 43.0 | 44.3 | no | no | yes | yes |"
        in text
    )
    assert "| y |" in text and "oom" in text


def test_one_cli_runs_the_benchmark_and_its_report(tmp_path):
    """`lora-gateway train-bench ...` passes everything to the benchmark, `... report FILES` to the tables."""
    from typer.testing import CliRunner

    from gateway.cli import app

    path = tmp_path / "r.json"
    train_bench.write_report(path, {"results": [{"name": "x", "status": "oom"}]})
    res = CliRunner().invoke(app, ["train-bench", "report", str(path)])
    assert res.exit_code == 0 and "| x |" in res.output and "oom" in res.output
    res = CliRunner().invoke(app, ["train-bench", "--help"])
    assert res.exit_code == 0 and "usage: lora-gateway train-bench" in res.output and "--suite" in res.output
    assert CliRunner().invoke(app, ["train-bench", "--steps", "0", "--out", "x"]).exit_code == 2


def test_our_path_is_timed_through_trainer_callbacks(monkeypatch):
    """A stand-in ``adapters.train`` on transformers' Trainer: the step timer and layer counter work."""
    import dataclasses
    import sys
    import types

    from transformers import Trainer, TrainingArguments

    @dataclasses.dataclass
    class TrainOptions:
        rank: int = 8
        batch_size: int = 1
        max_steps: int = 1
        gradient_checkpointing: bool = True
        output_dir: str = "out"

    def train_model(model, tokenizer, dataset, options, *, callbacks=()):
        from peft import LoraConfig, get_peft_model

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=options.rank, target_modules="all-linear"))
        rows = [
            {"input_ids": torch.tensor(r["input_ids"]), "labels": torch.tensor(r["input_ids"])}
            for r in dataset
        ]
        args = TrainingArguments(
            output_dir=options.output_dir,
            per_device_train_batch_size=options.batch_size,
            max_steps=options.max_steps,
            report_to=[],
            logging_steps=1,
            use_cpu=True,
            save_strategy="no",
        )
        Trainer(model=model, args=args, train_dataset=rows, callbacks=list(callbacks)).train()
        return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    fake = types.ModuleType("adapters.train")
    fake.TrainOptions, fake.train_model = TrainOptions, train_model
    monkeypatch.setitem(sys.modules, "adapters.train", fake)
    import adapters

    monkeypatch.setattr(adapters, "train", fake, raising=False)
    record = run_case(Case("tiny", "lora", "ours", 16, 2, 1.0), "cpu", warmup=1, steps=2)
    assert record["status"] == "ok", record.get("error")
    assert len(record["step_s"]) == 2
    assert record["layer_calls_per_step"] == 4 and record["checkpointing_active"] is True
    # the rank passed on
    assert record["trainable_params"] == lora_param_count(arch_dims("tiny"), LINEAR_MODULES, 16)
    assert record["notes"]["options"]["batch_size"] == 2


@pytest.mark.train
def test_our_path_runs_the_real_train_command_loop():
    """``--recipe ours`` calls ``adapters.train.train_model`` itself: checkpointing really recomputes."""
    record = run_case(Case("tiny", "lora", "ours", 16, 2, 1.0), "cpu", warmup=1, steps=2)
    assert record["status"] == "ok", record.get("error")
    assert len(record["step_s"]) == 2
    assert record["layer_calls_per_step"] == 4 and record["checkpointing_active"] is True
    assert record["trainable_params"] == lora_param_count(arch_dims("tiny"), LINEAR_MODULES, 16)
    assert record["notes"]["options"]["batch_size"] == 2 and record["notes"]["options"]["rank"] == 16
