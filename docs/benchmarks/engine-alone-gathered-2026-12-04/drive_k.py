"""python drive_k.py URL K CLIENTS SECONDS: client i asks rand-(i % K); prints output tok/s."""

import concurrent.futures as cf
import sys
import time

import httpx

url, k, conc, dur = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
prompt = " ".join(["users"] * 16)


def one(i: int) -> int:
    n, t = 0, time.time()
    model = f"rand-{i % k:02d}"
    with httpx.Client(timeout=120) as c:
        while time.time() - t < dur:
            body = {"model": model, "prompt": prompt, "max_tokens": 16, "ignore_eos": True, "temperature": 0}
            n += c.post(url + "/v1/completions", json=body).json()["usage"]["completion_tokens"]
    return n


t = time.time()
with cf.ThreadPoolExecutor(conc) as ex:
    n = sum(ex.map(one, range(conc)))
print(f"k={k} c={conc}: {n / (time.time() - t):.1f} tok/s")
