"""Models for the training benchmark: Llama-3 shapes with random weights, built on the device.

Nothing is downloaded: weights do not change the speed or the memory of a training step, only
the shapes do. ``llama_config("llama3-8b")`` is the architecture of Meta-Llama-3-8B (and
``"llama3-70b"`` of Meta-Llama-3-70B) as published in their ``config.json``; ``"tiny"`` is a
small model of the same family for CPU tests.

- ``build_bf16_model(config, device)``: the whole model in bf16, created directly on ``device``
  (no CPU copy, no fp32 copy).
- ``build_4bit_model(config, device)``: the model QLoRA trains on, built layer by layer: each
  decoder layer is created in bf16 on the device, its linear layers are quantized to NF4 with
  double quantization (bitsandbytes ``Linear4bit``, bf16 compute) and the bf16 copy is dropped
  before the next layer exists, so the full-precision model never exists at once (a 70B model
  peaks at about one bf16 layer, 1.7 GB, over its 4-bit size). This is what
  ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16))``
  produces: every ``nn.Linear`` but ``lm_head`` in 4-bit, embeddings, norms and head in bf16.

Parameter counts are computed from the config (``param_counts``) so they can be checked without
building anything: 8,030,261,248 for Llama-3-8B, 70,553,706,496 for Llama-3-70B.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapters.llama import LINEAR_MODULES, linear_shapes

#: Architecture of each model, as in the published config.json (rope scaling left out: it does not
#: change the work of a step at these lengths).
ARCHS: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama3-70b": {
        "vocab_size": 128256,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "vocab_size": 1024,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}

INIT_STD = 0.02


def arch_dims(arch: str, num_layers: int | None = None) -> dict[str, Any]:
    """The config fields of ``arch``, with ``num_hidden_layers`` replaced when ``num_layers`` is given."""
    if arch not in ARCHS:
        raise ValueError(f"arch: unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    dims = dict(ARCHS[arch])
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers: must be >= 1, got {num_layers}")
        dims["num_hidden_layers"] = num_layers
    return dims


def llama_config(arch: str, num_layers: int | None = None) -> Any:
    """A ``transformers.LlamaConfig`` of ``arch`` (bf16, sdpa attention, no KV cache)."""
    import torch
    from transformers import LlamaConfig

    config = LlamaConfig(**arch_dims(arch, num_layers), use_cache=False)
    config._attn_implementation = "sdpa"
    config.dtype = torch.bfloat16
    return config


def param_counts(dims: dict[str, Any]) -> dict[str, int]:
    """Parameters of the model by part; ``total`` is what ``model.num_parameters()`` reports."""
    h, vocab, layers = dims["hidden_size"], dims["vocab_size"], dims["num_hidden_layers"]
    linear = sum(i * o for i, o in linear_shapes(dims).values())
    per_layer = linear + 2 * h  # + input and post-attention RMSNorm
    embed = vocab * h
    lm_head = 0 if dims.get("tie_word_embeddings") else vocab * h
    return {
        "embedding": embed,
        "lm_head": lm_head,
        "per_layer": per_layer,
        "linear_per_layer": linear,
        "layers": layers * per_layer,
        "total": embed + lm_head + layers * per_layer + h,  # + final norm
    }


def lora_param_count(dims: dict[str, Any], targets: tuple[str, ...], rank: int) -> int:
    """Trainable parameters of a LoRA adapter of ``rank`` on ``targets`` in every decoder layer."""
    shapes = linear_shapes(dims)
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"targets: not a Llama linear layer: {sorted(unknown)}")
    return dims["num_hidden_layers"] * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def _random_(module: Any) -> None:
    """Fill ``module``'s weights in place: N(0, 0.02) for matrices, 1 for norms (never zeros)."""
    import torch

    with torch.no_grad():
        for param in module.parameters(recurse=True):
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, INIT_STD)


def build_bf16_model(config: Any, device: str) -> Any:
    """``LlamaForCausalLM`` of ``config`` in bf16 with random weights, allocated on ``device``."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device=device)
    _random_(model)
    _fresh_rotary(model, config, device)
    return model.train()


def _fresh_rotary(model: Any, config: Any, device: str) -> None:
    """Rebuild the rotary embedding: its ``inv_freq`` buffer is computed at init, not stored."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)


def quantize_linear(linear: Any, device: str) -> Any:
    """A bitsandbytes NF4 ``Linear4bit`` (double quantization, bf16 compute) holding ``linear``'s weight."""
    import bitsandbytes as bnb
    import torch

    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.bfloat16,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=torch.uint8,
        device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        linear.weight.data,
        requires_grad=False,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=torch.uint8,
        module=q,
    ).to(device)
    if linear.bias is not None:  # pragma: no cover - Llama has no biases
        q.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return q


def build_4bit_model(config: Any, device: str, on_layer: Callable[[int, int], None] | None = None) -> Any:
    """``LlamaForCausalLM`` with every decoder linear layer in NF4, built one layer at a time.

    The skeleton is created on the meta device; embeddings, final norm and ``lm_head`` are
    materialised in bf16 on ``device``; then each decoder layer is created in bf16 on ``device``,
    filled with random weights and its seven linear layers replaced by quantized ones before the
    next layer is created. ``on_layer(i, n)`` is called after each layer (progress).
    """
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    for part in (model.model.embed_tokens, model.model.norm, model.lm_head):
        part.to_empty(device=device)
        _random_(part)
    _fresh_rotary(model, config, device)
    n = config.num_hidden_layers
    previous = torch.get_default_dtype()
    for i in range(n):
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                layer = LlamaDecoderLayer(config, layer_idx=i)
        finally:
            torch.set_default_dtype(previous)
        _random_(layer)
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEAR_MODULES:
                if hasattr(parent, name):
                    setattr(parent, name, quantize_linear(getattr(parent, name), device))
        model.model.layers[i] = layer
        if on_layer is not None:
            on_layer(i, n)
    # What from_pretrained sets on a bitsandbytes 4-bit model; PEFT reads it.
    model.is_loaded_in_4bit = True
    model.quantization_method = "bitsandbytes"
    return model.train()
