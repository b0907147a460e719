"""Restarts and outages as devices live them: a gateway restarted while central is down, central
restarted with an empty route table, a gateway whose workers have not rejoined yet."""

from __future__ import annotations

import secrets
import signal
import threading
import time

import numpy as np
import pytest

from shoal.client import Client
from shoal.local import LocalCentral


@pytest.fixture
def site(tmp_path, model_repo):
    central = LocalCentral(tmp_path / "central").start()
    lc = central.start_cluster(tmp_path / "site-a", "site-a")
    try:
        lc.add_worker("echo", repo=model_repo)
        lc.wait_workers("echo", 1)
        central.wait_routable({"site-a"}, "echo")
        password = secrets.token_hex(8)
        central.add_account("device", "cam-1", password)
        yield central, lc, password
    finally:
        lc.stop()
        central.stop()


def _keep_sending(client: Client, stop: threading.Event, answered: list, failed: list) -> None:
    i = 0
    while not stop.is_set():
        x = np.full((1, 4), i, np.float32)
        try:
            r = client.infer("echo", {"x": x})
            assert float(r.outputs["y"][0, 0]) == i
            answered.append(time.monotonic())
        except Exception as e:  # counted: the test asserts there are none
            failed.append(repr(e))
        i += 1


def test_a_gateway_restarted_while_central_is_down_keeps_serving_devices(site):
    central, lc, password = site
    # A device that has its route, with a retry budget longer than a gateway restart on a busy machine.
    with Client(central.url, "cam-1", password, timeout=10, retries=10) as c:
        c.infer("echo", {"x": np.ones((1, 4), np.float32)})
        central.stop()
        stop, answered, failed = threading.Event(), [], []
        t = threading.Thread(target=_keep_sending, args=(c, stop, answered, failed))
        t.start()
        try:
            http_port, worker_port = lc.http_port, lc.worker_port
            lc.gateway.signal(signal.SIGKILL)
            lc.gateway.popen.wait(10)
            restarted = time.monotonic()
            lc.start(http_port=http_port, worker_port=worker_port)  # same ports; central still down
            lc.wait_workers("echo", 1)
            end = time.monotonic() + 30
            while not [a for a in answered if a > restarted] and time.monotonic() < end:
                time.sleep(0.05)
        finally:
            stop.set()
            t.join(60)
    assert failed == []
    assert [a for a in answered if a > restarted], "no answer from the restarted gateway"
    said = [line for line in lc.gateway.tail(100).splitlines() if "route-token key" in line]
    assert said and "from central " not in said[-1]  # read from its state folder, not from central


def test_devices_retry_while_a_restarted_central_fills_its_route_table(site):
    central, _, password = site
    port = central.http_port
    central.stop()
    central.start(http_port=port)
    # A new device, right after the restart: central answers "not yet" until the cluster reports.
    with Client(central.url, "cam-1", password, timeout=10) as c:
        r = c.infer("echo", {"x": np.ones((1, 4), np.float32)})
    assert r.cluster == "site-a"


def test_a_fresh_gateway_says_try_again_for_models_not_yet_joined(cluster, model_repo):
    lc = cluster()
    with lc.client() as c:
        code, headers, body = c.request(
            "POST",
            "/v2/models/echo/infer",
            b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1],"data":[1]}]}',
            {"Content-Type": "application/json"},
        )
        assert code == 503 and headers["retry-after"] == "1" and b"joining" in body
        lc.add_worker("echo", repo=model_repo)
        lc.wait_workers("echo", 1)
        assert c.infer("echo", {"x": np.ones((1, 1), np.float32)})["y"].shape == (1, 1)
