"""HTTP routes: `openai.py` (inference, OpenAI-compatible), `health.py` (health and metrics)."""
