"""``loadtest routing``: adapter-affinity routing vs round-robin over the same vLLM replicas."""
