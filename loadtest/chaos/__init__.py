"""``loadtest chaos``: clients keep sending while vLLM (or one of two replicas) is killed with SIGKILL once.

``clients`` (the clients and how each outcome is judged; also used by the engine tests), ``run`` (the
managed gateway, the kill, drift), ``report`` (results.json, report.md, chaos.png), ``cli``.
"""
