"""The front under overload, with a real gateway and a real worker of the ``slow`` test model (it
sleeps the seconds its input says, one request at a time, so its capacity is known): a request whose
answer would come after its deadline is refused at once with the time to wait; a high-priority
request overtakes the queue; a request whose client disconnected never runs if it had not started."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from waiting import wait_for


def body(delay: float, **parameters) -> bytes:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [delay]}]}
    if parameters:
        doc["parameters"] = parameters
    return json.dumps(doc).encode()


def slow_pool(lc) -> dict:
    return next(m for m in lc.status()["models"] if m["name"] == "slow")


@pytest.fixture
def slow(cluster, model_repo):
    lc = cluster("overload")
    lc.add_worker("slow", repo=model_repo)
    lc.wait_workers("slow", 1)
    return lc


async def _post(client: httpx.AsyncClient, url: str, data: bytes, headers: dict[str, str]) -> tuple:
    t0 = time.monotonic()
    r = await client.post(url, content=data, headers=headers)
    return r.status_code, r.headers, time.monotonic() - t0


def test_requests_that_would_miss_their_deadline_are_refused_at_once(slow):
    url = f"{slow.url}/v2/models/slow/infer"
    auth = {"Authorization": f"Bearer {slow.api_key}"}

    async def run() -> list[tuple]:
        async with httpx.AsyncClient(timeout=30) as c:
            first = await _post(c, url, body(0.5), auth)  # the gateway learns the model's time
            assert first[0] == 200
            # One worker, 0.5 s a request, 1.5 s each: about three fit, the rest cannot.
            headers = {**auth, "X-Request-Timeout-Ms": "1500"}
            return await asyncio.gather(*(_post(c, url, body(0.5), headers) for _ in range(10)))

    results = asyncio.run(run())
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(ok) + len(refused) == len(results), [r[0] for r in results]  # no 504: none timed out
    assert 2 <= len(ok) <= 4 and refused
    for _, headers, took in refused:
        assert int(headers["retry-after-ms"]) >= 1 and int(headers["retry-after"]) >= 1
        assert took < min(t for _, _, t in ok)  # refused before even the first answer came
    for _, _, took in ok:
        assert took < 1.5 + 0.5  # within the deadline (and the network's share)
    assert slow_pool(slow)["shed"] == len(refused)


def test_a_high_priority_request_overtakes_those_queued(slow):
    url = f"{slow.url}/v2/models/slow/infer"
    auth = {"Authorization": f"Bearer {slow.api_key}"}
    done: list[str] = []

    async def one(c: httpx.AsyncClient, name: str, **params) -> None:
        r = await c.post(url, content=body(0.3, **params), headers=auth)
        assert r.status_code == 200, r.text
        done.append(name)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            low = [asyncio.create_task(one(c, f"low{i}", priority=2)) for i in range(4)]
            # two at the worker (one running, one next), two queued at the gateway
            await asyncio.to_thread(wait_for, lambda: slow_pool(slow)["queue"] == 2, "no queue formed")
            await one(c, "high", priority=1)
            await asyncio.gather(*low)

    asyncio.run(run())
    assert done.index("high") == 2, done  # after the two the worker held, before the queued ones


def _send_raw(port: int, key: str, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    s.sendall(head.encode() + data)
    return s


def test_a_request_whose_client_left_never_runs_unless_it_had_started(slow):
    running = _send_raw(slow.http_port, slow.api_key, body(0.5))
    wait_for(lambda: slow_pool(slow)["in_flight"] == 1, "the first request never reached the worker")
    held = _send_raw(slow.http_port, slow.api_key, body(0.5))  # the worker's next
    wait_for(lambda: slow_pool(slow)["in_flight"] == 2, "the second request never reached the worker")
    queued = _send_raw(slow.http_port, slow.api_key, body(0.5))
    wait_for(lambda: slow_pool(slow)["queue"] == 1, "the third request was not queued")
    queued.close()  # gone before it ran: taken out of the queue
    running.close()  # gone while it ran: it completes, its answer is dropped
    wait_for(lambda: slow_pool(slow)["cancelled"] == 2, "the gateway did not see both clients leave")
    assert slow_pool(slow)["queue"] == 0
    answer = held.makefile("rb").readline()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    held.close()
    m = wait_for(lambda: (p := slow_pool(slow))["in_flight"] == 0 and p, "the worker never finished")
    # Model time on answers nobody read: the running one's 0.5 s, not the queued one's as well.
    assert 450 <= m["unread_ms"] < 1000, m


def test_a_device_over_its_rate_limit_is_refused_429_and_others_go_on(cluster, model_repo):
    lc = cluster("quota", ["--api-key", "device:slow:devkey", "--quota", "device=0.1/2"])
    lc.add_worker("slow", repo=model_repo)
    lc.wait_workers("slow", 1)
    url = f"{lc.url}/v2/models/slow/infer"
    with httpx.Client(timeout=30) as c:
        device = [c.post(url, content=body(0.0), headers={"Authorization": "Bearer devkey"}) for _ in range(3)]
        operator = c.post(url, content=body(0.0), headers={"Authorization": f"Bearer {lc.api_key}"})
        metrics = c.get(f"{lc.url}/metrics", headers={"Authorization": f"Bearer {lc.api_key}"}).text
    assert [r.status_code for r in device[:2]] == [200, 200]  # the burst
    limited = device[2]
    assert limited.status_code == 429 and "rate limit" in limited.json()["error"]
    ms = int(limited.headers["retry-after-ms"])  # one request every 10 s after the burst of two
    assert 1 <= ms <= 10_000 and int(limited.headers["retry-after"]) == -(-ms // 1000)
    assert operator.status_code == 200  # the operator's role has no quota
    assert 'shoal_quota_refused_total{role="device"} 1.0' in metrics
