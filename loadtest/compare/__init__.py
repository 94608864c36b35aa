"""``loadtest compare``: merged serving vs adapter-only serving, on servers it starts and stops itself."""
