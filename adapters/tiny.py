"""The embedded default base model: a tiny Llama generated locally and deterministically.

Nothing is downloaded. `build_tiny(cache_dir)` writes, into `<cache_dir>/models/<TINY_NAME>/`:

- `config.json` + `model.safetensors`: a Llama-architecture model (hidden 256, 2 layers, 4 heads,
  head_dim 64) with weights from a fixed seed;
- a byte-level BPE tokenizer (512 tokens) trained with `tokenizers` on a generated corpus, saved as a
  `PreTrainedTokenizerFast` with a chat template, so vLLM's chat route works.

The build is idempotent: a `BUILD_ID` file records the spec it was built from; a folder with the same
spec is reused, anything else is rebuilt into a temporary folder and swapped in atomically.

Heavy imports (torch, transformers, tokenizers) happen inside the functions: the gateway never pays
for them on its request path.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

TINY_NAME = "tiny-llama"

#: Everything that determines the bytes of the built model. Change it and the cache is rebuilt.
TINY_SPEC: dict[str, object] = {
    "version": 1,
    "seed": 1234,
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 1024,
    "corpus_lines": 4000,
}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "for",
    "on",
    "with",
    "by",
    "from",
    "at",
    "as",
    "is",
    "are",
    "was",
    "be",
    "this",
    "that",
    "it",
    "and",
    "or",
    "not",
    "all",
    "any",
    "show",
    "list",
    "find",
    "count",
    "how",
    "many",
    "what",
    "which",
    "who",
    "where",
    "when",
    "give",
    "me",
    "please",
    "users",
    "orders",
    "products",
    "customers",
    "employees",
    "items",
    "sales",
    "name",
    "age",
    "price",
    "city",
    "country",
    "year",
    "total",
    "amount",
    "id",
    "email",
    "status",
    "date",
    "created",
    "older",
    "younger",
    "than",
    "more",
    "less",
    "greater",
    "equal",
    "between",
    "top",
    "first",
    "last",
    "order",
    "group",
    "select",
    "from",
    "where",
    "limit",
    "by",
    "asc",
    "desc",
    "join",
    "on",
    "and",
    "or",
    "insert",
    "update",
    "delete",
    "set",
    "values",
    "table",
    "into",
    "hello",
    "world",
    "reply",
    "answer",
    "question",
    "style",
    "pirate",
    "formal",
    "shout",
    "whisper",
    "upper",
    "lower",
    "yes",
    "no",
    "thanks",
    "model",
    "adapter",
    "lora",
    "serve",
    "request",
    "response",
    "token",
    "stream",
    "chat",
    "completion",
    "base",
    "gateway",
    "engine",
]


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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=target.parent))
    try:
        _write_tokenizer(tmp)
        _write_model(tmp)
        (tmp / "BUILD_ID").write_text(build_id() + "\n")
        _swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _swap_into_place(tmp: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def corpus(lines: int, seed: int) -> list[str]:
    """A deterministic corpus of short sentences, numbers and SQL-ish text for the tokenizer."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        n = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if i % 3 == 0:
            words.append(str(rng.randint(0, 999)))
        sentence = " ".join(words)
        if i % 5 == 0:
            sentence = sentence.capitalize() + "?"
        elif i % 7 == 0:
            sentence = sentence.upper() + "!"
        out.append(sentence)
    return out


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
    tok.train_from_iterator(corpus(int(spec["corpus_lines"]), int(spec["seed"])), trainer=trainer)
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
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(int(spec["seed"]))
    model = LlamaForCausalLM(config)
    model.generation_config.do_sample = False
    model.save_pretrained(folder, safe_serialization=True)
