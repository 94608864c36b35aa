"""The GPU training benchmark of ``adapters.train``: Llama-3 shapes, LoRA and QLoRA, peak memory,
tokens/s, MFU (docs/training-benchmarks.md). Needs torch, transformers and PEFT (the ``train`` extra)."""
