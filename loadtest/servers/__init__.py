"""The servers a load test or benchmark starts and stops, and what is read from them.

- ``processes``      the gateway and vLLM, each in its own process group; memory, file sizes, ``/metrics``
- ``serving``        any ASGI app in a thread (real uvicorn, free port), or a command in a subprocess
- ``fast_upstream``  a minimal OpenAI/vLLM-compatible server that answers at once (``python -m``)
- ``litellm_proxy``  LiteLLM's proxy in its own venv (``.cache/litellm-venv``), for comparison only
"""
