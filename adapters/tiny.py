"""The embedded default base model: a tiny Llama generated locally and deterministically.

Nothing is downloaded. `build_tiny(cache_dir)` writes, into `<cache_dir>/models/<TINY_NAME>/`:

- `config.json` + `model.safetensors`: a Llama-architecture model (hidden 256, 2 layers, 4 heads,
  head_dim 64), initialised from a fixed seed and then pre-trained (full parameters, one thread,
  `pretrain_steps` steps) on the generated corpus of `adapters.demo_data.base_corpus`: the demo
  domain unpaired, and instructed chat skills that copy a request's values (`extract:`, `json:`,
  `repeat:`). LoRA adapters then learn new tasks on it in CPU-minutes; on a random-init base LoRA
  plateaus, unable to copy values from the prompt (issue 4's probe);
- a byte-level BPE tokenizer (1024 tokens) trained with `tokenizers` on a generated corpus where every
  domain word and number is frequent enough to be one token, saved as a `PreTrainedTokenizerFast`
  with a chat template, so vLLM's chat route works;
- `build_info.json`: the pre-training's steps, loss curve and wall time.

The build is idempotent: a `BUILD_ID` file records the spec it was built from; a folder with the same
spec is reused, anything else is rebuilt into a temporary folder and swapped in atomically.

Heavy imports (torch, transformers, tokenizers) happen inside the functions: the gateway never pays
for them on its request path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from adapters.artifacts import atomic_output

TINY_NAME = "tiny-llama"

#: Everything that determines the bytes of the built model. Change it and the cache is rebuilt.
TINY_SPEC: dict[str, object] = {
    "version": 6,
    "seed": 1234,
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
    "corpus_lines": 3000,
    "pretrain_steps": 1000,
    "pretrain_batch_size": 32,
    "pretrain_lr": 1e-3,
    "pretrain_warmup": 0.1,
    # One thread: about as fast as two on this model's small matrices, and 10-20x faster when another
    # process holds a core (two OpenMP threads then keep waiting on each other).
    "pretrain_threads": 1,
    # Mostly the instructed copy skills: with them at half the mix, whether the base learned to copy
    # numbers varied from build to build; at 80% it copies every value of the held-out requests.
    "pretrain_mix": {"request": 1, "sql": 1, "pirate": 1, "extract": 6, "json": 6, "echo": 1},
}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_id() -> str:
    """A short digest of `TINY_SPEC` and the chat template: the cache key of the built model."""
    blob = json.dumps({"spec": TINY_SPEC, "chat": CHAT_TEMPLATE, "special": SPECIAL_TOKENS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tiny_model_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / TINY_NAME


def is_built(cache_dir: Path) -> bool:
    marker = tiny_model_dir(cache_dir) / "BUILD_ID"
    return marker.is_file() and marker.read_text().strip() == build_id()


def build_tiny(cache_dir: Path, *, force: bool = False) -> Path:
    """Build the tiny base model into the cache (idempotent) and return its folder."""
    target = tiny_model_dir(cache_dir)
    if is_built(cache_dir) and not force:
        return target
    with atomic_output(target, overwrite=True) as tmp:
        _write_tokenizer(tmp)
        _write_model(tmp)
        (tmp / "BUILD_ID").write_text(build_id() + "\n")
    return target


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = TINY_SPEC
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=int(spec["vocab_size"]),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    from adapters.demo_data import tokenizer_corpus

    tok.train_from_iterator(tokenizer_corpus(int(spec["corpus_lines"]), int(spec["seed"])), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=int(spec["max_position_embeddings"]),
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def _write_model(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = TINY_SPEC
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(
        vocab_size=int(spec["vocab_size"]),
        hidden_size=int(spec["hidden_size"]),
        intermediate_size=int(spec["intermediate_size"]),
        num_hidden_layers=int(spec["num_hidden_layers"]),
        num_attention_heads=int(spec["num_attention_heads"]),
        num_key_value_heads=int(spec["num_key_value_heads"]),
        head_dim=int(spec["head_dim"]),
        max_position_embeddings=int(spec["max_position_embeddings"]),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=bool(spec["tie_word_embeddings"]),
        torch_dtype="float32",
    )
    torch.manual_seed(int(spec["seed"]))
    model = LlamaForCausalLM(config)
    info = pretrain(model, tokenizer, spec)
    model.eval()
    model.generation_config.do_sample = False
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")


def _render(tokenizer: Any, doc: tuple[str, object]) -> str:
    kind, content = doc
    if kind == "chat":
        return tokenizer.apply_chat_template(content, tokenize=False)
    return f"{tokenizer.bos_token}{content}{tokenizer.eos_token}"


def pretrain(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Full-parameter pre-training on `base_corpus` (deterministic: fixed seed, data order and threads)."""
    import torch

    from adapters.demo_data import base_corpus

    steps, batch = int(spec["pretrain_steps"]), int(spec["pretrain_batch_size"])
    docs = [
        _render(tokenizer, d) for d in base_corpus(steps * batch, int(spec["seed"]), spec["pretrain_mix"])
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(int(spec["pretrain_threads"]))
    torch.manual_seed(int(spec["seed"]))
    lr = float(spec["pretrain_lr"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=float(spec["pretrain_warmup"])
    )
    losses: list[float] = []
    started = time.perf_counter()
    log = logging.getLogger("lora_gateway")
    model.train()
    try:
        for step in range(steps):
            enc = tokenizer(
                docs[step * batch : (step + 1) * batch],
                add_special_tokens=False,
                padding=True,
                return_tensors="pt",
            )
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
            if (step + 1) % 100 == 0 or step + 1 == steps:
                elapsed = time.perf_counter() - started
                log.info(
                    "tiny base pre-training: step %d/%d, loss %.3f, %.0f s",
                    step + 1,
                    steps,
                    losses[-1],
                    elapsed,
                )
    finally:
        torch.set_num_threads(threads)
    return {
        "pretrain_steps": steps,
        "pretrain_wall_s": round(time.perf_counter() - started, 1),
        "pretrain_loss_first": losses[0] if losses else None,
        "pretrain_loss_last": losses[-1] if losses else None,
        "pretrain_loss": losses,
    }
