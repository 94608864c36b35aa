"""vLLM engines behind the gateway: managed (spawned and supervised here) or attached (run elsewhere)."""
