"""The stream relay's hot path, below the HTTP frameworks: `engine.py` (streaming connections to the
engines, parsed with httptools in the read callback), `client.py` (uvicorn's protocol offering the client's
socket). gateway/proxy.py joins the two for each streamed request."""
