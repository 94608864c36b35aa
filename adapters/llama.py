"""The linear layers of a Llama decoder layer as PEFT names them: which block holds each, and its shape.

    linear_shapes(config)   {"q_proj": (in_features, out_features), ...} from config.json's fields

Validation (`adapters/validate.py`), random adapters (`adapters/demo.py`), the training benchmark
(`adapters/bench/model.py`) and the tests' adapters read these names and shapes from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES
#: The block of a decoder layer each linear layer sits in (`model.layers.<i>.<block>.<name>`).
BLOCKS = {**dict.fromkeys(ATTENTION_MODULES, "self_attn"), **dict.fromkeys(MLP_MODULES, "mlp")}


def linear_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one decoder layer, from a model's config.

    `num_key_value_heads` defaults to `num_attention_heads`, `head_dim` to hidden / heads (as in
    transformers' LlamaConfig)."""
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
