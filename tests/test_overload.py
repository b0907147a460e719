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
    after = _send_raw(slow.http_port, slow.api_key, body(0.5))  # a client that stays
    wait_for(lambda: slow_pool(slow)["queue"] == 2, "the fourth request was not queued")
    queued.close()  # gone before it ran: taken out of the gateway's queue
    held.close()  # gone while the worker held it, before it ran: the worker drops it
    running.close()  # gone while it ran: it completes, its answer is dropped
    wait_for(lambda: slow_pool(slow)["cancelled"] == 3, "the gateway did not see the clients leave")
    answer = after.makefile("rb").readline()  # it runs next, after the running one
    assert answer.startswith(b"HTTP/1.1 200"), answer
    after.close()
    m = wait_for(lambda: (p := slow_pool(slow))["in_flight"] == 0 and p, "the worker never finished")
    # Model time on answers nobody read: the running one's 0.5 s, not the held or queued one's.
    assert 450 <= m["unread_ms"] < 1000, m
    assert m["queue"] == 0


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


def test_a_grpc_call_cancelled_while_queued_never_runs(slow):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import numpy as np

    running = _send_raw(slow.http_port, slow.api_key, body(0.5))
    held = _send_raw(slow.http_port, slow.api_key, body(0.5))
    wait_for(lambda: slow_pool(slow)["in_flight"] == 2, "the worker does not hold two requests")
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{slow.grpc_port}")
    x = grpcclient.InferInput("x", [1, 1], "FP32")
    x.set_data_from_numpy(np.array([[0.5]], np.float32))
    answers: list = []
    call = c.async_infer(
        "slow", [x], lambda result, error: answers.append(error), headers={"authorization": f"Bearer {slow.api_key}"}
    )
    wait_for(lambda: slow_pool(slow)["queue"] == 1, "the call was not queued")
    call.cancel()
    wait_for(lambda: slow_pool(slow)["cancelled"] == 1, "the gateway did not see the call cancelled")
    assert slow_pool(slow)["queue"] == 0
    for s in (running, held):
        assert s.makefile("rb").readline().startswith(b"HTTP/1.1 200")
        s.close()
    m = wait_for(lambda: (p := slow_pool(slow))["in_flight"] == 0 and p, "the worker never finished")
    assert m["unread_ms"] == 0  # the cancelled call never ran
    c.close()


def test_a_grpc_call_that_cannot_be_answered_in_time_is_refused_with_when_to_try_again(slow):
    grpc = pytest.importorskip("grpc")
    from shoal.protocol.oip_grpc import grpc_service_pb2 as pb
    from shoal.protocol.oip_grpc.grpc_service_pb2_grpc import GRPCInferenceServiceStub

    warm = httpx.post(
        f"{slow.url}/v2/models/slow/infer", content=body(0.5), headers={"Authorization": f"Bearer {slow.api_key}"}
    )
    assert warm.status_code == 200  # the gateway learns the model's time
    running = [_send_raw(slow.http_port, slow.api_key, body(0.5)) for _ in range(2)]
    wait_for(lambda: slow_pool(slow)["in_flight"] == 2, "the worker does not hold two requests")
    req = pb.ModelInferRequest(model_name="slow")
    t = req.inputs.add()
    t.name, t.datatype = "x", "FP32"
    t.shape.extend([1, 1])
    req.raw_input_contents.append(b"\x00\x00\x00\x3f")  # 0.5
    with grpc.insecure_channel(f"127.0.0.1:{slow.grpc_port}") as ch:
        stub = GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:  # 1.5 s of work before it, a 1 s deadline
            stub.ModelInfer(req, metadata=(("authorization", f"Bearer {slow.api_key}"),), timeout=1.0)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "overloaded" in e.value.details()
    assert int(dict(e.value.trailing_metadata())["retry-after-ms"]) >= 1
    for s in running:
        s.close()


def test_a_request_that_cannot_be_answered_in_time_is_refused_before_its_body_is_read(slow):
    warm = httpx.post(
        f"{slow.url}/v2/models/slow/infer", content=body(0.5), headers={"Authorization": f"Bearer {slow.api_key}"}
    )
    assert warm.status_code == 200  # the gateway learns the model's time
    running = [_send_raw(slow.http_port, slow.api_key, body(0.5)) for _ in range(2)]
    wait_for(lambda: slow_pool(slow)["in_flight"] == 2, "the worker does not hold two requests")
    s = socket.create_connection(("127.0.0.1", slow.http_port))
    head = (
        f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {slow.api_key}\r\n"
        "X-Request-Timeout-Ms: 100\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    )
    s.sendall(head.encode())  # the head only: a megabyte announced, none sent
    answer = s.makefile("rb").readline()
    assert answer.startswith(b"HTTP/1.1 503"), answer
    for c in (s, *running):
        c.close()
