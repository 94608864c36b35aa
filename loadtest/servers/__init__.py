"""The servers a load test or benchmark starts and stops: the gateway and vLLM in their own processes,
the fast upstream, LiteLLM's proxy, and ASGI apps in a thread; what is read from them."""
