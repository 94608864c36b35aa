"""``loadtest routing``: adapter-affinity routing vs round-robin over the same vLLM replicas.

- ``run``     the replicas, one gateway per policy and level, the same requests for both
- ``report``  loads per 1000 requests, TTFT and throughput per policy, affinity / round-robin, plots
- ``cli``     the ``routing`` command
"""
