"""``loadtest overhead``: what the gateway adds over a direct upstream (and over LiteLLM's proxy)."""
