"""The GPU training benchmark of ``adapters.train``: Llama-3 shapes, LoRA and QLoRA, peak memory,
tokens/s, MFU (docs/training-benchmarks.md). Needs torch, transformers and PEFT (the ``train`` extra);
importing the package does not import them.

- ``cli``      ``lora-gateway train-bench ...`` and ``... report`` (``python -m adapters.bench``)
- ``run``      the planned cases (suites), the options, the results file, the main loop
- ``measure``  one case: build, set up, warm up, time; tokens/s, memory, MFU arithmetic
- ``model``    Llama-3 shapes with random weights, built on the device (bf16, or 4-bit layer by layer)
- ``recipes``  the recipes compared: the textbook ``baseline``, the ``levers``, and ``ours``
- ``ours``     our train path (``adapters.train.train_model``) timed through trainer callbacks
- ``loss``     cross-entropy through the LM head in chunks, without the full fp32 logits
- ``report``   markdown tables from results files: which cards each configuration fits
"""
