"""Closed-loop load straight at one vLLM: `python drive.py URL MODEL CLIENTS SECONDS` prints output tok/s.

Each client sends the same 60-word prompt for 32 tokens (`ignore_eos`, greedy) until SECONDS have passed.
"""

import concurrent.futures as cf
import sys
import time

import httpx

url, model, conc, dur = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
prompt = " ".join(["users"] * 60)


def one(_: int) -> int:
    n, t = 0, time.time()
    with httpx.Client(timeout=60) as c:
        while time.time() - t < dur:
            body = {"model": model, "prompt": prompt, "max_tokens": 32, "ignore_eos": True, "temperature": 0}
            n += c.post(url + "/v1/completions", json=body).json()["usage"]["completion_tokens"]
    return n


t = time.time()
with cf.ThreadPoolExecutor(conc) as ex:
    n = sum(ex.map(one, range(conc)))
print(f"{model} c={conc}: {n / (time.time() - t):.1f} tok/s")
