"""A cluster served by several gateways, as real processes: workers link to every gateway (from a list,
or told of the others by the first they reach) and keep serving the others when one dies; gateways
of one machine share the HTTP port (``--processes``); exactly one takes the autoscaling decisions and
another takes over when it dies; an operator's unload at one gateway applies at all of them."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from waiting import wait_for

from shoal.client.http import OipHttpClient
from shoal.local import LocalCluster

X = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(url: str, key: str) -> dict:
    """One gateway's status, on a new connection (behind a shared port: whichever the kernel picks)."""
    with OipHttpClient(url, key, timeout=5.0) as c:
        code, body = c.get_json("/v2/status")
    assert code == 200, body
    return body


def statuses(lc: LocalCluster, n: int) -> dict[str, dict]:
    """The status of each of the ``n`` gateway processes behind one port, by gateway id."""
    seen: dict[str, dict] = {}

    def all_seen() -> bool:
        s = status(lc.url, lc.api_key)
        seen[s["gateway_id"]] = s
        return len(seen) >= n

    wait_for(all_seen, f"{n} gateways answering on port {lc.http_port}")
    return seen


def workers_seen(s: dict, model: str) -> list[dict]:
    return [w for m in s["models"] if m["name"] == model for w in m["workers"] if w["accepting"]]


@pytest.fixture
def gateways(tmp_path: Path):
    started: list[LocalCluster] = []

    def make(**kw) -> LocalCluster:
        lc = LocalCluster(tmp_path / f"gw{len(started)}", **kw)
        started.append(lc)
        return lc

    yield make
    for lc in started:
        lc.stop()


def test_processes_share_the_http_port_and_a_worker_serves_every_one(gateways):
    lc = gateways(processes=2).start()
    assert len(lc.worker_ports) == 2 and len(set(lc.worker_ports)) == 2
    lc.add_worker("echo")  # told only of the first gateway: the first names the second
    wait_for(
        lambda: all(
            len(workers_seen(s, "echo")) == 1 and workers_seen(s, "echo")[0]["load"].get("links") == 2
            for s in statuses(lc, 2).values()
        ),
        "the worker linked to both gateways",
    )
    shares = [workers_seen(s, "echo")[0]["capacity"] for s in statuses(lc, 2).values()]
    size = workers_seen(next(iter(statuses(lc, 2).values())), "echo")[0]["load"]["capacity"]
    assert sum(shares) >= size - 1 and all(s >= 1 for s in shares), shares  # divided, not doubled
    answered = 0
    for _ in range(40):  # new connections: both processes answer
        with OipHttpClient(lc.url, lc.api_key, timeout=10.0) as c:
            out = c.infer("echo", X)
        np.testing.assert_array_equal(out["y"], X["x"])
        answered += 1
    assert answered == 40


def test_workers_link_to_gateways_that_start_after_them_and_survive_one_dying(gateways):
    ports = [free_port() for _ in range(3)]
    addresses = ",".join(f"127.0.0.1:{p}" for p in ports)
    first = gateways()
    secret, key = first.secret, first.api_key

    def gateway(i: int, lc: LocalCluster | None = None) -> LocalCluster:
        lc = lc or gateways(secret=secret, api_key=key)
        peers = [f"--peer=127.0.0.1:{p}" for j, p in enumerate(ports) if j != i]
        lc.gateway_args = [f"--gateway-id=g{i}", *peers]
        return lc.start(worker_port=ports[i], http_port=0)

    gws = [gateway(0, first)]
    early = first.add_worker("echo", extra=["--gateway", addresses])  # two of its gateways are not up yet
    wait_for(lambda: workers_seen(status(gws[0].url, key), "echo"), "the early worker at g0")
    gws += [gateway(1), gateway(2)]
    late = gws[2].add_worker("echo", secret=secret)  # told of g2 only: g2 names the others
    for lc in gws:
        wait_for(
            lambda lc=lc: len(workers_seen(status(lc.url, key), "echo")) == 2, f"both workers at {lc.name}"
        )
    for lc in gws:
        with OipHttpClient(lc.url, key, timeout=10.0) as c:
            np.testing.assert_array_equal(c.infer("echo", X)["y"], X["x"])

    gws[1].gateway.signal(9)  # one gateway dies: the workers keep serving the others
    gws[1].gateway.popen.wait(10)
    for lc in (gws[0], gws[2]):
        wait_for(
            lambda lc=lc: all(w["load"].get("links") == 2 for w in workers_seen(status(lc.url, key), "echo")),
            f"the workers at {lc.name} counting two gateways",
        )
        with OipHttpClient(lc.url, key, timeout=10.0) as c:
            for _ in range(20):
                np.testing.assert_array_equal(c.infer("echo", X)["y"], X["x"])
    assert early.alive() and late.alive()
    gateway(1, gws[1])  # back on its port: the workers find it again
    wait_for(lambda: len(workers_seen(status(gws[1].url, key), "echo")) == 2, "both workers back at g1")


def test_a_worker_that_reaches_only_one_gateway_serves_it_and_names_the_other(gateways):
    missing = f"127.0.0.1:{free_port()}"  # a gateway of the cluster that nothing answers at
    lc = gateways(gateway_args=[f"--peer={missing}"]).start()
    lc.add_worker("echo")
    s = wait_for(
        lambda: (
            (x := status(lc.url, lc.api_key))
            and workers_seen(x, "echo")
            and workers_seen(x, "echo")[0]["load"].get("unreached")
            and x
        ),
        "the worker reporting the gateway it cannot reach",
    )
    w = workers_seen(s, "echo")[0]
    assert w["load"]["unreached"] == [missing]
    assert w["load"]["links"] == 1
    assert w["capacity"] == w["load"]["capacity"]  # the whole of it: there is no other gateway to share with
    with lc.client() as c:
        np.testing.assert_array_equal(c.infer("echo", X)["y"], X["x"])


AUTOSCALE = """
autoscale:
  engine: local
  models:
    echo: {min: 1, max: 2}
"""


def test_one_gateway_decides_and_another_takes_over_when_it_dies(gateways, tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(AUTOSCALE)
    lc = gateways(processes=2, gateway_args=["--config", str(cfg)]).start()

    def deciders() -> list[str]:
        return sorted(i for i, s in statuses(lc, 2).items() if s["membership"]["deciding"])

    wait_for(lambda: len(deciders()) == 1, "exactly one gateway deciding")
    wait_for(
        lambda: all(workers_seen(s, "echo") for s in statuses(lc, 2).values()), "the minimum worker at both"
    )
    before = deciders()[0]
    index = [i for i, pid in enumerate(lc.gateway_pids) if str(statuses(lc, 2)[before]["pid"]) == str(pid)][0]
    t = time.monotonic()
    lc.kill_gateway(index)
    survivor = wait_for(
        lambda: [i for i, s in statuses(lc, 1).items() if i != before and s["membership"]["deciding"]],
        "another gateway taking the decisions over",
        timeout=20.0,
    )[0]
    took = time.monotonic() - t
    # Still one decider once the killed gateway is back (restarted by its supervisor), and the
    # model has its worker again.
    wait_for(lambda: len(statuses(lc, 2)) == 2 and deciders() == [survivor], "one decider after the restart")
    wait_for(
        lambda: all(workers_seen(s, "echo") for s in statuses(lc, 2).values()), "the worker back at both"
    )
    assert took < 20.0


def test_an_unload_at_one_gateway_applies_at_every_gateway(gateways, tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(AUTOSCALE)
    lc = gateways(processes=2, gateway_args=["--config", str(cfg)]).start()
    wait_for(
        lambda: all(workers_seen(s, "echo") for s in statuses(lc, 2).values()), "the minimum worker at both"
    )
    with lc.client() as c:
        code, _, body = c.request("POST", "/v2/repository/models/echo/unload")
    assert code == 200, body

    def unloaded(s: dict) -> bool:
        return any(m["name"] == "echo" and m["unloaded"] and not workers_seen(s, "echo") for m in s["models"])

    wait_for(lambda: all(unloaded(s) for s in statuses(lc, 2).values()), "echo unloaded at both gateways")
    with lc.client() as c:
        code, _, body = c.request("POST", "/v2/repository/models/echo/load")
    assert code == 200, body
    wait_for(
        lambda: all(workers_seen(s, "echo") and not unloaded(s) for s in statuses(lc, 2).values()),
        "echo served again at both gateways",
    )


def test_gateways_on_separate_machines_agree_through_central(tmp_path, gateways):
    """Two gateways of one cluster that know nothing of each other but central: central names each to
    the other (the workers link to both), holds the one decision lease, and carries an unload made
    at one gateway to the other; when the decider dies, the other takes the lease over."""
    from shoal.local import LocalCentral

    cfg = tmp_path / "gw.yaml"
    cfg.write_text(AUTOSCALE)
    central = LocalCentral(tmp_path / "central", extra_args=["--report-interval", "0.5"]).start()
    try:
        password = "site-password-1"
        central.add_account("cluster", "site", password)
        first = gateways(name="site", central_urls=[central.url], central_password=password)
        gws = [first] + [
            gateways(
                name="site",
                secret=first.secret,
                api_key=first.api_key,
                central_urls=[central.url],
                central_password=password,
            )
        ]
        for i, lc in enumerate(gws):
            lc.gateway_args = ["--config", str(cfg), f"--gateway-id=g{i}"]
            lc.start()

        def views() -> dict[str, dict]:
            return {
                s["gateway_id"]: s for s in (status(lc.url, lc.api_key) for lc in gws if lc.gateway.alive())
            }

        wait_for(
            lambda: all(
                [w["load"].get("links") for w in workers_seen(s, "echo")] == [2] for s in views().values()
            ),
            "one echo worker, linked to both gateways",
            timeout=40.0,
        )
        deciding = [g for g, s in views().items() if s["membership"]["deciding"]]
        assert len(deciding) == 1, views()
        follower = gws[1] if deciding == ["g0"] else gws[0]
        with follower.client() as c:
            code, _, body = c.request("POST", "/v2/repository/models/echo/unload")
        assert code == 200, body
        wait_for(
            lambda: all(
                any(m["name"] == "echo" and m["unloaded"] for m in s["models"])
                and not workers_seen(s, "echo")
                for s in views().values()
            ),
            "echo unloaded at both gateways, its worker gone",
            timeout=30.0,
        )
        with follower.client() as c:
            code, _, body = c.request("POST", "/v2/repository/models/echo/load")
        assert code == 200, body
        wait_for(lambda: all(workers_seen(s, "echo") for s in views().values()), "echo served again at both")

        decider = gws[0] if deciding == ["g0"] else gws[1]
        decider.gateway.signal(9)
        decider.gateway.popen.wait(10)
        wait_for(
            lambda: (
                (s := status(follower.url, follower.api_key))["membership"]["deciding"]
                and workers_seen(s, "echo")
            ),
            "the other gateway deciding, with a worker of its own engine",
            timeout=30.0,
        )
    finally:
        central.stop()


def test_a_gateway_restarted_after_it_died_leaves_the_decisions_to_the_survivor(tmp_path):
    """The folder channel: a lone gateway takes the decider's lock at once; one restarted (same id)
    while another is alive does not race it for the lock it left, so the survivor takes over."""
    from shoal.gateway.membership import FolderChannel, Membership, Record

    now = [0.0]

    def gateway(gid: str) -> FolderChannel:
        return FolderChannel(tmp_path, Membership(gid), wants_to_decide=True, clock=lambda: now[0])

    a, b = gateway("a"), gateway("b")
    a.step(Record("a"))
    b.step(Record("b"))  # b started beside a live gateway: it leaves the lock to the others a while
    now[0] += 60.0
    a.step(Record("a"))
    b.step(Record("b"))
    assert a.m.deciding() and not b.m.deciding() and b.m.decider == "a"
    os.close(a._lock_fd)  # a dies: the kernel releases its lock; its record is still fresh
    again = gateway("a")  # restarted by the supervisor before b's next round
    again.step(Record("a"))
    now[0] += 0.1
    again.step(Record("a"))  # its rounds right after its start do not take the lock either
    assert not again.m.deciding()
    now[0] += 0.9
    b.step(Record("b"))
    again.step(Record("a"))
    assert b.m.deciding() and not again.m.deciding() and again.m.decider == "b"
    lone = FolderChannel(tmp_path / "alone", Membership("c"), wants_to_decide=True)
    lone.step(Record("c"))  # nobody else alive: it takes the lock at once
    assert lone.m.deciding() and lone.m.decider == "c"
