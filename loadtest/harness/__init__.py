"""The load-test harness: what to send, how to send it, what came back, and the files it writes.

- ``workload``        what to send: models under a mix, synthetic prompts, Poisson schedules
- ``records``         what one request did (``RequestResult``)
- ``parse``           reading OpenAI responses (JSON and SSE) into a record; no network
- ``senders``         a job (URL + request) and the clients that send it: httpx, ``make_sender``
- ``aiohttp_sender``  the low-CPU client, for when the generator shares cores with what it measures
- ``runner``          how requests are paced: closed loop (fixed concurrency), open loop (Poisson rate)
- ``stats``           the field's metric names (TTFT, TPOT, ITL, e2e, throughput); pure functions
- ``verify``          every answer checked against its model's answer to that request alone
- ``sweep``           one workload at each level (the ``run`` command), answers checked with ``verify``
- ``machine``         where it was measured (CPU, platform, versions)
- ``report``          ``results.json``, ``requests.jsonl``, ``report.md``, PNG plots, and the tables,
                      ratios and plot panels every scenario's report is made of
- ``scenario``        what the scenarios on their own servers share: configuration checks, adapters and
                      their ranks, private copies in a work folder, what vLLM and a gateway hold
- ``level``           one measured closed-loop level of such a scenario, with the gateway's counters
- ``options``         the command-line options the load-test commands share

Only ``scenario`` and ``level`` reach the servers (``loadtest.servers``), and start none.
"""
