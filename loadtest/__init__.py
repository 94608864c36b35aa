"""Load-test harness for any OpenAI-compatible endpoint.

Modules, one idea each:

- ``workload``       what to send: models under a mix, synthetic prompts, Poisson schedules
- ``records``        what one request did (``RequestResult``)
- ``parse``          reading OpenAI responses (JSON and SSE) into a record; no network
- ``runner``         how to send: closed loop (fixed concurrency), open loop (Poisson rate), senders
- ``aiohttp_sender`` the low-CPU client, for when the generator shares cores with what it measures
- ``stats``          the field's metric names (TTFT, TPOT, ITL, e2e, throughput); pure functions
- ``sweep``          the ``run`` command's plan: one workload at each level
- ``machine``        where it was measured (CPU, platform, versions)
- ``report``         ``results.json``, ``requests.jsonl``, ``report.md`` and PNG plots
- ``fast_upstream``  a minimal OpenAI/vLLM-compatible server that answers at once
- ``serving``        running a server in a thread or a subprocess for tests and benchmarks
- ``servers``        the gateway and vLLM processes a benchmark starts and stops; their memory, metrics
- ``overhead``       direct vs through the gateway (and other proxies), interleaved, at fixed rates
- ``overhead_report`` its files: results.json, report.md, plots
- ``overhead_suite`` ``overhead --out`` alone: fast upstream, gateway, LiteLLM, real vLLM, closed loop
- ``overhead_suite_report`` the suite's targets table and closed-loop table
- ``litellm_proxy``  LiteLLM's proxy in its own venv (``.cache/litellm-venv``), for comparison only
- ``compare``        merged vs adapter-only serving, and the thrash scenario, on servers it starts
- ``compare_report`` ratios per concurrency, loads, memory, plots
- ``cli``            the typer app mounted as ``lora-gateway loadtest`` (``cli_compare``: compare,
                     thrash, benchmark)

Importing the package is cheap: heavy imports (matplotlib, uvicorn, aiohttp) happen in functions.
"""
