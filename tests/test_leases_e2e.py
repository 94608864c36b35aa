"""Leases against the real vLLM: an adapter with a request in flight is never evicted, and every lease is
released exactly once, on every way a request can end.

A lease is one request's hold on one adapter in one engine (`gateway/residency/leases.py`); `/admin/engines`
shows, per adapter, the leases acquired and released so far. After each way of ending below, the
gateway's in-flight list is empty again and acquired == released, with the count of acquisitions the
path should take (one per request, two when the request was retried, one for `n > 1`):

- success, streamed and not; `n > 1` streamed (one request, one lease, whatever `n`)
- an error from vLLM after the lease was taken (a prompt longer than the model's context)
- the client gone mid-stream; the client gone before the first byte (a long non-streamed request whose
  client leaves while vLLM generates); the client gone at once after sending a streamed request
- a retry: vLLM lost the adapter behind the gateway's back (unloaded directly), answers 404, the gateway
  forgets it, loads it again and sends the request again (the first lease is released before the second)

And with every slot held by streams, a cold adapter's request waits and gets 503 while vLLM itself keeps
listing and running the held adapters: what vLLM runs is what the gateway counts in flight.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from tests.conftest import ENGINE_AUTH, GatewayProcess, serve_app
from tests.registry_helpers import (
    PROMPT,
    assert_stopped,
    complete,
    engine,
    held_stream,
    leases,
    metric,
    registry_settings,
    vllm_adapters,
    vllm_ran_adapters_since,
    vllm_running_adapters,
    write_adapter,
)
from tests.test_errors_e2e import assert_openai_error
from tests.test_residency_e2e import register_xyz

pytestmark = pytest.mark.engine

T = TypeVar("T")
REQUESTS = "lora_gateway_requests_total"  # counted when a request has ended, after its lease went back


@pytest.fixture(scope="module")
def leased(
    gateway_proc: GatewayProcess,
    cache_dir: Path,
    tiny_cache: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict]:
    """One in-process gateway over the session's vLLM with x, y, z registered (demo-a, demo-b pinned)."""
    tmp_path = tmp_path_factory.mktemp("leases")
    root = tmp_path / "src"
    for i, name in enumerate(["x", "y", "z"]):
        write_adapter(tiny_cache["base"], root / name, seed=2300 + i)
    registry = {"max_resident": 4, "load_wait_timeout_s": 1.0, "drain_after_s": 30}
    # One probe at start only: the retry test unloads an adapter behind the gateway's back, and a probe
    # in between would notice before the request does.
    engine_ = {"health_interval_s": 300}
    vllm_url = gateway_proc.vllm_url
    settings = registry_settings(
        vllm_url, cache_dir, tmp_path, root, registry=registry, engine=engine_, retry_after_s=2
    )
    with serve_app(settings) as url:
        names = register_xyz(url, tiny_cache, root)
        yield {"url": url, "vllm": vllm_url, "names": names, "context": held_stream(tiny_cache)["max_tokens"]}
    assert_stopped(url)


def settle(url: str, timeout: float = 90) -> dict[str, dict[str, int]]:
    """Wait until nothing is in flight; then every lease acquired has been released, exactly once."""
    deadline = time.monotonic() + timeout
    while (info := engine(url))["in_flight"]:
        assert time.monotonic() < deadline, f"a lease was never released: {info['in_flight']}"
        time.sleep(0.05)
    counts = info["leases"]
    unbalanced = {k: c for k, c in counts.items() if c["acquired"] != c["released"]}
    assert not unbalanced, f"acquired != released with nothing in flight: {unbalanced}"
    return counts


def acquired(url: str, key: str) -> int:
    return leases(url).get(key, {}).get("acquired", 0)


def takes_leases(leased: dict, model: str, expected: int, action: Callable[[], T]) -> T:
    """`action()`'s result, once its leases on `model` are all back: `expected` of them taken."""
    url, key = leased["url"], leased["names"][model]
    settle(url)
    before = acquired(url, key)
    result = action()
    counts = settle(url)
    assert counts[key]["acquired"] - before == expected, counts[key]
    return result


def body(model: str, **kw: object) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, **kw}


def test_success_streamed_and_not_and_n_above_one(leased: dict) -> None:
    url = leased["url"]
    takes_leases(leased, "x", 1, lambda: complete(url, "x").raise_for_status())

    def stream(**kw: object) -> None:
        with httpx.stream(
            "POST", url + "/v1/completions", json=body("x", stream=True, **kw), timeout=60
        ) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)

    takes_leases(leased, "x", 1, stream)
    takes_leases(leased, "x", 1, lambda: stream(n=3, temperature=1.0, seed=3))


def test_an_error_from_vllm_after_the_lease(leased: dict) -> None:
    url = leased["url"]
    too_long = body("y", prompt=" ".join(["users"] * (2 * leased["context"])))

    def post() -> None:
        r = httpx.post(url + "/v1/completions", json=too_long, timeout=60)
        assert_openai_error(r, 400)  # vLLM's own refusal, passed through

    takes_leases(leased, "y", 1, post)


def test_the_client_gone_mid_stream(leased: dict) -> None:
    url = leased["url"]

    def leave() -> None:
        with httpx.stream(
            "POST", url + "/v1/completions", json={**held_stream_body(leased), "model": "x"}, timeout=60
        ) as r:
            assert r.status_code == 200
            next(r.iter_lines())

    takes_leases(leased, "x", 1, leave)


def held_stream_body(leased: dict) -> dict:
    return body("x", max_tokens=leased["context"], stream=True, n=8, temperature=1.0, logprobs=20)


def raw_request(url: str, payload: dict) -> socket.socket:
    """Send one HTTP request over a plain socket (so the test decides when the connection closes)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(payload).encode()
    sock = socket.create_connection((host, int(port)))
    head = f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
    sock.sendall(head.encode() + f"content-length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def answered(sock: socket.socket) -> bytes:
    """What the gateway has sent on `sock` so far (nothing, while the request runs)."""
    sock.setblocking(False)
    try:
        return sock.recv(65536, socket.MSG_PEEK)
    except BlockingIOError:
        return b""
    finally:
        sock.setblocking(True)


def test_the_client_gone_before_the_first_byte(leased: dict) -> None:
    url, key = leased["url"], leased["names"]["y"]

    def left_while_generating() -> bool:
        """Not streamed: nothing is sent before vLLM has finished, so the client leaves before any byte.
        While vLLM generates on both cores, one look at the gateway can take as long as the generation
        (seen in CI): when the answer came before the lease was seen, this try did not leave in time."""
        sock = raw_request(url, body("y", max_tokens=leased["context"] - 64, n=4, temperature=1.0))
        deadline = time.monotonic() + 60
        while engine(url)["in_flight"].get(key) != 1:
            if answered(sock):
                sock.close()
                return False
            assert time.monotonic() < deadline, "the request neither took its lease nor was answered"
            time.sleep(0.02)
        sock.close()
        return True

    tries = 5
    for _ in range(tries):
        before = metric(url, "lora_gateway_request_errors_total", code="client_disconnected")
        if takes_leases(leased, "y", 1, left_while_generating):
            after = metric(url, "lora_gateway_request_errors_total", code="client_disconnected")
            assert after == before + 1, "the request the client left is not a client_disconnected error"
            break
    else:
        pytest.fail(f"in {tries} tries the client never left while the request held its lease")

    # A streamed request whose client closes the connection right after sending it: the gateway may meet
    # the closed connection before or after it took the lease; either way it ends, and nothing stays held.
    settle(url)
    done = metric(url, REQUESTS)
    raw_request(url, {**held_stream_body(leased), "model": "y"}).close()
    deadline = time.monotonic() + 60
    while metric(url, REQUESTS) == done:
        assert time.monotonic() < deadline, "the request never ended"
        time.sleep(0.05)
    settle(url)


def test_a_retry_releases_the_first_lease(leased: dict) -> None:
    url, vllm, key = leased["url"], leased["vllm"], leased["names"]["z"]
    complete(url, "z").raise_for_status()  # resident now
    settle(url)
    # vLLM loses the adapter behind the gateway's back; the gateway still believes it resident.
    unload = httpx.post(
        vllm + "/v1/unload_lora_adapter", json={"lora_name": key}, headers=ENGINE_AUTH, timeout=30
    )
    unload.raise_for_status()
    retries = metric(url, "lora_gateway_retries_total", reason="adapter_lost")
    takes_leases(leased, "z", 2, lambda: complete(url, "z").raise_for_status())
    assert metric(url, "lora_gateway_retries_total", reason="adapter_lost") == retries + 1
    assert key in vllm_adapters(vllm)


def test_an_adapter_with_a_request_in_flight_is_never_evicted(leased: dict) -> None:
    url, vllm, names = leased["url"], leased["vllm"], leased["names"]
    settle(url)
    held = {names["x"], names["y"]}
    stream = held_stream_body(leased)
    started = time.time()
    with (
        httpx.Client(base_url=url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json={**stream, "model": "x"}) as sx,
        http.stream("POST", "/v1/completions", json={**stream, "model": "y"}) as sy,
    ):
        assert sx.status_code == sy.status_code == 200
        running: set[str] = set()
        deadline = time.monotonic() + 30
        while not held <= running:  # vLLM's scheduler has run both held adapters' requests
            assert time.monotonic() < deadline, f"vLLM ran {running}, not {held}"
            running = vllm_ran_adapters_since(vllm, started)
        assert running <= set(engine(url)["in_flight"]), "vLLM ran an adapter the gateway does not count"
        # Every slot is leased: z waits for one, gets none, and evicts nothing in flight.
        r = complete(url, "z")
        assert_openai_error(r, 503, "adapter_slots_busy")
        assert r.headers["retry-after"] == "2"
        assert held <= vllm_adapters(vllm), "vLLM still lists both adapters with requests in flight"
        info = engine(url)
        assert info["in_flight"] == {names["x"]: 1, names["y"]: 1}
        assert held <= set(info["resident_adapters"])
    settle(url)
    assert complete(url, "z").status_code == 200  # idle now: one of them makes room


def test_an_aborted_requests_adapter_stays_held_while_vllm_runs_it(leased: dict) -> None:
    """The client leaves a stream: the gateway drops the connection at once, but vLLM stops the request at
    a later step. Until vLLM's own metrics stop showing the adapter running or queued, the gateway keeps
    counting it in flight, so no eviction can unload it under vLLM (which crashed vLLM 0.32 under load). Each
    look reads the gateway first, then vLLM: vLLM running it after the gateway let it go would be the bug."""
    url, vllm, key = leased["url"], leased["vllm"], leased["names"]["x"]
    settle(url)
    started = time.time()
    with httpx.stream("POST", url + "/v1/completions", json=held_stream_body(leased), timeout=60) as r:
        assert r.status_code == 200
        deadline = time.monotonic() + 30
        while key not in vllm_ran_adapters_since(vllm, started):
            assert time.monotonic() < deadline, "vLLM never ran the request"
    # The client has left. Look until the gateway lets go.
    looks, running_after_leave, violations = 0, 0, []
    deadline = time.monotonic() + 30
    while True:
        held = key in engine(url)["in_flight"]
        running = key in vllm_running_adapters(vllm, waiting=True)
        looks += 1
        running_after_leave += running
        if running and not held:
            violations.append(f"look {looks}: vLLM runs {key}, the gateway no longer holds it")
        if not held and not running:
            break
        assert time.monotonic() < deadline, "the lease was never released"
    assert not violations, violations
    print(f"\nvLLM still ran the aborted request in {running_after_leave} of {looks} looks; the lease waited")
    settle(url)
