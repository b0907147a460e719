"""The whole system as real processes: central, clusters reporting to it, devices routing through it."""

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from waiting import wait_for

from shoal.client import Client, InferError
from shoal.client.http import OipHttpClient
from shoal.local import LocalCentral, LocalCluster


@contextlib.contextmanager
def _system(workdir, model_repo, central_args=()):
    """central + two clusters (two echo workers each) + device accounts; everything stops at the end."""
    central = LocalCentral(workdir / "central", extra_args=list(central_args)).start()
    clusters = []
    devices = {f"dev{i}": secrets.token_hex(6) for i in range(6)}
    try:
        for name in ("cluster-a", "cluster-b"):
            lc = central.start_cluster(workdir / name, name)
            clusters.append(lc)
            for _ in range(2):
                lc.add_worker("echo", repo=model_repo)
        for d, pw in devices.items():
            central.add_account("device", d, pw)
        for lc in clusters:
            lc.wait_workers("echo", 2)
        central.wait_routable({"cluster-a", "cluster-b"}, "echo")
        yield central, clusters, devices
    finally:
        for lc in clusters:
            lc.stop()
        central.stop()


@pytest.fixture
def system(tmp_path, model_repo):
    """A system of the test's own, for the tests that kill part of it."""
    with _system(tmp_path, model_repo) as s:
        yield s


@pytest.fixture(scope="module")
def shared_system(tmp_path_factory, model_repo):
    """One system for the tests that leave it as they found it (each with devices of its own); its
    start-up grace is over by the time they run anyway."""
    with _system(tmp_path_factory.mktemp("shared"), model_repo, ["--startup-grace", "0"]) as s:
        yield s


def _route(central, device: str, password: str) -> int:
    """The status of one route request for echo, as a device with Basic credentials."""
    auth = base64.b64encode(f"{device}:{password}".encode()).decode()
    headers = {"Authorization": f"Basic {auth}", "Content-Type": "application/json"}
    with OipHttpClient(central.url, timeout=30.0) as c:
        return c.request("POST", "/v1/route", b'{"model": "echo"}', headers)[0]


def drive(central, devices, n_each, on_progress=None):
    """Each device sends n_each requests through its own Client; returns (answers per cluster, failures)."""
    per_cluster: dict[str, int] = {}
    failures: list[str] = []
    lock = threading.Lock()
    done = [0]

    def device(name, pw):
        with Client(central.url, name, pw, timeout=10) as c:
            for i in range(n_each):
                x = np.full((1, 4), i, np.float32)
                try:
                    r = c.infer("echo", {"x": x})
                    assert float(r.outputs["y"][0, 0]) == i
                    with lock:
                        per_cluster[r.cluster] = per_cluster.get(r.cluster, 0) + 1
                        done[0] += 1
                        k = done[0]
                    if on_progress:
                        on_progress(k)
                except Exception as e:  # asserted on by the caller
                    with lock:
                        failures.append(f"{name}: {e!r}")

    ts = [threading.Thread(target=device, args=item) for item in devices.items()]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return per_cluster, failures


def test_devices_spread_over_clusters_and_survive_one_dying(system):
    central, clusters, devices = system
    killed = threading.Event()

    def progress(k):
        if k == 300 and not killed.is_set():
            killed.set()
            clusters[0].gateway.signal(signal.SIGKILL)

    per_cluster, failures = drive(central, devices, 120, progress)
    assert killed.is_set()
    assert failures == []
    assert sum(per_cluster.values()) == 6 * 120
    assert per_cluster.get("cluster-a", 0) > 0 and per_cluster.get("cluster-b", 0) > 0
    # After the kill, central drops cluster-a from the route table within three report intervals.
    end = time.monotonic() + 6
    while time.monotonic() < end:
        code, body = central.call("GET", "/v1/clusters")
        if {c["name"] for c in body["clusters"]} == {"cluster-b"}:
            break
        time.sleep(0.1)
    assert {c["name"] for c in body["clusters"]} == {"cluster-b"}


def test_central_down_cached_routes_keep_working_and_restart_recovers(system):
    central, clusters, devices = system
    name, pw = next(iter(devices.items()))
    with Client(central.url, name, pw, timeout=5) as c:
        first = c.infer("echo", {"x": np.ones((1, 4), np.float32)})
        port = central.http_port
        central.proc.signal(signal.SIGKILL)
        central.proc.popen.wait(5)
        for _ in range(50):
            r = c.infer("echo", {"x": np.ones((1, 4), np.float32)})
            assert r.cluster == first.cluster
        central.start(http_port=port)
        # Until both clusters are back, a device asking for a route is told "not yet" (503, during
        # central's start-up grace of three report intervals) or routed, never "no" (404): the
        # clusters report again within the grace.
        other, other_pw = list(devices.items())[1]
        answers = []

        def both_back() -> bool:
            back = central.routable("echo") >= {"cluster-a", "cluster-b"}
            answers.append(_route(central, other, other_pw))
            return back

        wait_for(both_back, "the clusters did not report to the restarted central")
        assert set(answers) <= {503, 200} and answers[-1] == 200, answers
        assert c.infer("echo", {"x": np.ones((1, 4), np.float32)}).outputs["y"].sum() == 4


def test_wrong_device_password_and_unserved_model(shared_system):
    central, _, devices = shared_system
    name = "dev3"
    with Client(central.url, name, "wrong", timeout=5) as c:
        with pytest.raises(Exception, match="401"):
            c.infer("echo", {"x": np.ones((1, 4), np.float32)})
    # One retry (the client asks again when central has no route), not the default six: the same
    # path, without three seconds of back-off.
    with Client(central.url, name, devices[name], timeout=5, retries=1) as c:
        with pytest.raises(Exception, match="nosuch"):
            c.infer("nosuch", {"x": np.ones((1, 4), np.float32)})


def test_route_token_is_for_one_cluster_only(shared_system):
    central, clusters, devices = shared_system
    name, pw = "dev4", devices["dev4"]
    with Client(central.url, name, pw, timeout=5) as c:
        route = c.route("echo")
    other = next(lc for lc in clusters if lc.name != route.cluster)
    with OipHttpClient(other.url, route.token) as direct:
        with pytest.raises(InferError, match="401: invalid token"):  # signed with the other cluster's key
            direct.infer("echo", {"x": np.ones((1, 4), np.float32)})
    with OipHttpClient(route.url, route.token) as direct:
        assert direct.infer("echo", {"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 4)


def test_demo_runs_and_reports_json(tmp_path):
    # Its logs go to a temporary folder (here under tmp_path), removed when it succeeds.
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "demo", "--requests", "600", "--devices", "8", "--json", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["requests"] == 600 and summary["ok"] == 600 and summary["failed"] == 0
    assert summary["accuracy"] >= 0.97
    assert set(summary["clusters"]) == {"cluster-a", "cluster-b"}
    assert summary["killed"] and summary["p50_ms"] > 0 and summary["rps"] > 0
    assert not list(tmp_path.glob("shoal-demo-*")), "the demo left its temporary folder"


def test_elastic_demo_follows_the_load_and_reports_json(tmp_path):
    # A day of 12 s (the demo scales its windows to the day): still scales out, in, to zero and back.
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "demo", "--elastic", "--day-s", "12", "--devices", "16", "--json",
         "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("requests", "ok", "failed", "workers_min", "workers_max", "scale_ups", "scale_downs",
                "wakeups", "worker_seconds", "static_worker_seconds"):
        assert key in s
    assert s["failed"] == 0 and s["ok"] == s["requests"] > 0
    assert s["workers_min"] == 1 and s["workers_max"] >= 2 and s["scale_ups"] >= 1
    assert s["wakeups"] >= 1  # the sleeping model was woken by its first request
    assert s["worker_seconds"] < s["static_worker_seconds"]
    assert (tmp_path / "elastic.png").stat().st_size > 10_000


def test_operator_command_reaches_the_device(shared_system):
    central, _, devices = shared_system
    name, pw = "dev5", devices["dev5"]
    got: list = []
    with Client(central.url, name, pw, timeout=5) as c:
        t = threading.Thread(target=lambda: got.extend(c.commands(wait_s=10)))
        t.start()
        # The poll is this device's first request: central lists it once the poll is waiting there.
        wait_for(lambda: name in {d["name"] for d in central.call("GET", "/v1/status")[1]["devices"]},
                  "the long poll never reached central")
        code, body = central.call(
            "POST", f"/v1/devices/{name}/commands", {"command": "reboot", "args": {"delay_s": 5}}
        )
        assert code in (200, 201), body
        t.join(30)
        assert not t.is_alive(), "the command did not end the long poll"
        assert [g["command"] for g in got] == ["reboot"] and got[0]["args"] == {"delay_s": 5}
        c.ack(got[0]["id"], {"ok": True})
        assert c.commands(wait_s=0) == []


def test_the_whole_system_over_tls(tmp_path, model_repo):
    """Our own CA; TLS device-central, device-gateway, gateway-central and worker-gateway."""
    from shoal.security.certs import make_ca, make_cert

    pki = tmp_path / "pki"
    ca, _ = make_ca(pki)
    certs = {n: make_cert(pki, n, ["127.0.0.1", "localhost"], pki) for n in ("central", "site-a")}
    central = LocalCentral(
        tmp_path / "central", tls=(str(certs["central"][0]), str(certs["central"][1]), str(ca))
    )
    central.start()
    lc = None
    try:
        central.add_account("cluster", "site-a", "cluster-pw-1")
        central.add_account("device", "cam", "device-pw-1")
        lc = LocalCluster(
            tmp_path / "site-a",
            name="site-a",
            central_urls=[central.url],
            central_password="cluster-pw-1",
            tls=(str(certs["site-a"][0]), str(certs["site-a"][1]), str(ca)),
        ).start()
        lc.add_worker("echo", repo=model_repo)
        lc.wait_workers("echo", 1)
        central.wait_routable({"site-a"}, "echo")
        with Client(central.url, "cam", "device-pw-1", ca_file=str(ca), timeout=5) as c:
            r = c.infer("echo", {"x": np.arange(4, dtype=np.float32).reshape(1, 4)})
            assert r.cluster == "site-a" and r.outputs["y"].tolist() == [[0, 1, 2, 3]]
            assert c.route("echo").url.startswith("https://")
        # System CAs only; one attempt: the certificate is the answer, retrying would not change it.
        with Client(central.url, "cam", "device-pw-1", timeout=5, retries=0) as untrusting:
            with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
                untrusting.infer("echo", {"x": np.ones((1, 4), np.float32)})
    finally:
        if lc is not None:
            lc.stop()
        central.stop()
