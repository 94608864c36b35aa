"""The load-test harness: what to send, how to send it, what came back, and the files it writes.

Any scenario is built from these; none of them starts a server (``loadtest.servers`` does).
"""
