"""``loadtest overhead``: what the gateway adds over a direct upstream (and over LiteLLM's proxy).

- ``run``           direct vs through the gateway (and other proxies), interleaved, at fixed rates
- ``report``        its files: results.json, requests.jsonl, report.md, plots
- ``suite``         ``overhead --out`` alone: fast upstream, gateway, LiteLLM, real vLLM, closed loop
- ``suite_report``  the suite's targets table and closed-loop table
- ``cli``           the ``overhead`` command
"""
