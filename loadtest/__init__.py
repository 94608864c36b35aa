"""Load tests and benchmarks for any OpenAI-compatible endpoint, mounted as ``lora-gateway loadtest``.

Packages:

- ``harness``   what to send and how, what came back, the statistics and the files a run writes; any
                scenario is built from it (``run`` is the harness alone, against any endpoint)
- ``servers``   what a scenario starts and stops: the gateway and vLLM in their own processes, the fast
                upstream, LiteLLM's proxy, servers in a thread; what is read from them
- ``overhead``  what the gateway adds over a direct upstream (and over LiteLLM's proxy)
- ``compare``   merged serving vs adapter-only serving, on servers it starts itself
- ``thrash``    more adapters than slots (measured inside compare's run, beside all resident)
- ``routing``   adapter-affinity routing vs round-robin over the same vLLM replicas

Each scenario package has its ``run``, ``report`` and ``cli``. ``cli`` here is the typer app: ``run``,
``fast-upstream`` and ``benchmark`` (every scenario in turn), and the scenarios' commands.
The GPU training benchmark is not here: it is ``adapters.bench`` (``lora-gateway train-bench``), as it
measures ``adapters.train`` and needs torch.

Importing the package is cheap: heavy imports (matplotlib, uvicorn, aiohttp) happen in functions.
"""
