"""A cluster served by several gateways, against ``shoal central`` as a real process: route answers
name the cluster's least-loaded gateway and the others as fall-backs; the decision lease goes to
exactly one gateway, moves when its holder falls silent, and is never given to two by replicas
sharing one database (SQLite, and the PostgreSQL server of this machine when there is one); a device
whose gateway is killed finishes its request on another gateway of the route without asking central.

Gateways are played by reporter threads posting reports as the cluster's account, except in the
fail-over test, where they are real ``shoal cluster`` processes."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import signal
import threading
import time
from typing import Any

import numpy as np
from conftest import _pg
from test_central_server import PW, CentralProc, model
from waiting import wait_for

from shoal.client import AsyncClient, Client
from shoal.local import LocalCluster
from shoal.security.tokens import verify_token

INTERVAL = 0.2  # central's report interval here: a gateway is out after 0.6 s of silence
LEASE_S = 3.0  # max(3 s, 3 report intervals)
FAST = ["--report-interval", str(INTERVAL), "--startup-grace", "0"]


def report(
    central: CentralProc, cluster: tuple[str, str], gateway: str, port: int, models: list[dict], decide=False
) -> dict:
    body = {
        "address": f"http://127.0.0.1:{port}",
        "models": models,
        "gateway": gateway,
        "workers": f"127.0.0.1:{port + 1}",
        "decide": decide,
    }
    code, answer = central.call("POST", "/v1/clusters/report", body, auth=cluster)
    assert code == 200, answer
    return answer


class Gateway(threading.Thread):
    """A gateway as central sees it: a report every interval to each replica; the last answers kept."""

    def __init__(self, centrals: list[CentralProc], cluster, gateway: str, port: int, models, decide=False):
        super().__init__(daemon=True)
        self.centrals, self.cluster, self.gateway, self.port = centrals, cluster, gateway, port
        self.models, self.decide = models, decide
        self.answers: dict[int, dict] = {}  # replica index -> its last answer
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for i, c in enumerate(self.centrals):
                try:
                    self.answers[i] = report(
                        c, self.cluster, self.gateway, self.port, self.models, self.decide
                    )
                except (OSError, AssertionError):
                    pass
            self.halt.wait(INTERVAL)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)

    def decider(self, replica: int = 0) -> str | None:
        a = self.answers.get(replica)
        return None if a is None else a["decider"]

    def peers(self, replica: int = 0) -> list[str]:
        return [g["id"] for g in self.answers.get(replica, {}).get("gateways", [])]


def route(central: CentralProc, device, model_name="echo") -> dict:
    code, answer = central.call("POST", "/v1/route", {"model": model_name}, auth=device)
    assert code == 200, answer
    return answer


def routes_answered(central: CentralProc) -> int:
    return central.call("GET", "/v1/status")[1]["routes"]["answered"]


# ------------------------------------------------------------------------------------ routes


def test_a_route_names_the_least_loaded_gateway_and_the_others_as_fallbacks(tmp_path):
    central = CentralProc(tmp_path, extra=FAST).start()
    gateways: list[Gateway] = []
    try:
        site = central.account("cluster", "gw-site")
        device = central.account("device", "gw-cam")
        busy = Gateway([central], site, "gw-a", 18100, [model("echo", in_flight=10, capacity=16)])
        idle = Gateway([central], site, "gw-b", 18200, [model("echo", in_flight=2, capacity=16)])
        other = Gateway([central], site, "gw-c", 18300, [model("other-model")])
        gateways = [busy, idle, other]
        for g in gateways:
            g.start()
        wait_for(
            lambda: busy.peers() == ["gw-a", "gw-b", "gw-c"], "the three gateways never showed in an answer"
        )
        peer = next(p for p in busy.answers[0]["gateways"] if p["id"] == "gw-b")
        assert peer["address"] == "http://127.0.0.1:18200" and peer["workers"] == "127.0.0.1:18201"
        assert peer["models"][0]["in_flight"] == 2 and peer["decider"] is False

        r = route(central, device)
        assert r["cluster"] == "gw-site" and r["url"] == "http://127.0.0.1:18200"
        assert r["fallbacks"] == ["http://127.0.0.1:18100"]  # gw-c does not serve echo
        assert verify_token(r["token"], _key(busy.answers[0]), audience="gw-site")["model"] == "echo"

        # The cluster's load is the sum over its gateways; each gateway is listed with its own.
        (view,) = central.call("GET", "/v1/clusters")[1]["clusters"]
        echo = next(m for m in view["models"] if m["name"] == "echo")
        assert (echo["in_flight"], echo["capacity"], echo["load"]) == (12, 32, 0.375)
        assert view["address"] == "http://127.0.0.1:18300"  # gw-c's load is 0: the least loaded
        assert [(g["id"], g["live"]) for g in view["gateways"]] == [
            ("gw-a", True),
            ("gw-b", True),
            ("gw-c", True),
        ]
        assert [g["load"] for g in view["gateways"]] == [0.625, 0.125, 0.0]
        metrics = central.call("GET", "/metrics")[1].decode()
        assert 'shoal_central_gateways_live{cluster="gw-site"} 3.0' in metrics

        # The least-loaded gateway falls silent: it leaves the route within three report intervals.
        idle.stop()
        wait_for(lambda: route(central, device)["fallbacks"] == [], "the silent gateway stayed in the route")
        assert route(central, device)["url"] == "http://127.0.0.1:18100"
        gws = central.call("GET", "/v1/status")[1]["clusters"][0]["gateways"]
        assert [(g["id"], g["live"]) for g in gws] == [("gw-a", True), ("gw-b", False), ("gw-c", True)]
        assert "gw-b" not in busy.peers()
    finally:
        for g in gateways:
            g.stop()
        central.stop()


def test_an_older_gateway_without_an_id_is_a_cluster_of_one(tmp_path):
    central = CentralProc(tmp_path, extra=["--startup-grace", "0"]).start()
    try:
        old = central.account("cluster", "old-site")
        device = central.account("device", "old-cam")
        answer = central.report(old, [model("echo")], address="http://127.0.0.1:18400")
        assert answer["gateways"][0]["id"] == "" and answer["decider"] == ""
        r = route(central, device)
        assert r["url"] == "http://127.0.0.1:18400" and r["fallbacks"] == []
        # Asking for the lease needs a name to hold it by.
        code, err = central.call(
            "POST",
            "/v1/clusters/report",
            {"address": "http://127.0.0.1:18400", "models": [], "decide": True},
            auth=old,
        )
        assert code == 400 and "gateway" in err["error"]
        # An id the name rule refuses is a 400 naming the field; so is a worker address too long.
        for bad in ({"gateway": "-x"}, {"gateway": "a b"}, {"workers": "h" * 257}):
            body = {"address": "http://127.0.0.1:18400", "models": [], **bad}
            code, err = central.call("POST", "/v1/clusters/report", body, auth=old)
            assert code == 400 and next(iter(bad)) in err["error"], err
    finally:
        central.stop()


def _key(answer: dict) -> bytes:
    return base64.urlsafe_b64decode(answer["token_key"])


# ----------------------------------------------------------------------------- decision lease


def test_the_decision_lease_goes_to_one_gateway_and_moves_when_it_falls_silent(tmp_path):
    central = CentralProc(tmp_path, extra=FAST).start()
    gateways: list[Gateway] = []
    try:
        site = central.account("cluster", "lease-site")
        a = Gateway([central], site, "gw-a", 18500, [model("echo")], decide=True)
        b = Gateway([central], site, "gw-b", 18600, [model("echo")], decide=True)
        watcher = Gateway([central], site, "gw-w", 18700, [model("echo")])  # never asks
        gateways = [a, b, watcher]
        for g in gateways:
            g.start()
        wait_for(lambda: a.decider() and b.decider() and watcher.decider(), "no gateway got the lease")
        holder = a.decider()
        assert holder in ("gw-a", "gw-b")
        # Every gateway's next answer names the same holder, also in its list of peers.
        wait_for(
            lambda: b.decider() == holder and watcher.decider() == holder, "answers disagree on the holder"
        )
        flags = {p["id"]: p["decider"] for p in watcher.answers[0]["gateways"]}
        assert flags == {"gw-a": holder == "gw-a", "gw-b": holder == "gw-b", "gw-w": False}
        assert central.call("GET", "/v1/status")[1]["clusters"][0]["gateways"][0]["decider"] == (
            holder == "gw-a"
        )

        # The holder stops reporting: the other takes the lease once it expires, within lease_s.
        dead, other = (a, b) if holder == "gw-a" else (b, a)
        dead.stop()
        t0 = time.monotonic()
        wait_for(lambda: other.decider() == other.gateway, "the lease never moved", timeout=LEASE_S + 10)
        moved = time.monotonic() - t0
        assert moved < LEASE_S + 2 * INTERVAL + 0.5, moved
        wait_for(lambda: watcher.decider() == other.gateway, "the watcher never learnt the new holder")

        # A holder that no longer asks releases it: a waiting gateway has it at its next report.
        back = Gateway([central], site, dead.gateway, dead.port, [model("echo")], decide=True)
        gateways.append(back)
        back.start()
        wait_for(lambda: back.decider() == other.gateway, "the returning gateway did not see the holder")
        t0 = time.monotonic()
        other.decide = False
        wait_for(lambda: back.decider() == back.gateway, "the released lease was not taken")
        assert time.monotonic() - t0 < LEASE_S  # released, not expired
    finally:
        for g in gateways:
            g.stop()
        central.stop()


def _one_holder_across_replicas(tmp_path, db: str, rounds: int = 12) -> None:
    r1 = CentralProc(tmp_path, db=db, name="replica-1", extra=FAST).start()
    r2 = CentralProc(tmp_path, db=db, name="replica-2", extra=FAST).start()
    try:
        for i in range(rounds):
            # A fresh cluster each round: both gateways ask at once, each through both replicas.
            site = r1.account("cluster", f"race-{i}")
            calls = [(g, c) for g in ("gw-a", "gw-b") for c in (r1, r2)]
            answers: dict[tuple[str, str], str] = {}
            barrier = threading.Barrier(len(calls))

            def ask(g: str, c: CentralProc, site=site, answers=answers, barrier=barrier) -> None:
                barrier.wait()
                answers[(g, c.name)] = report(c, site, g, 18800, [model("echo")], decide=True)["decider"]

            threads = [threading.Thread(target=ask, args=call) for call in calls]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert len(answers) == 4 and len(set(answers.values())) == 1, answers
            assert set(answers.values()) <= {"gw-a", "gw-b"}
    finally:
        r1.stop()
        r2.stop()


def test_two_replicas_on_sqlite_never_give_the_lease_to_two(tmp_path):
    _one_holder_across_replicas(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}")


def test_two_replicas_on_postgresql_never_give_the_lease_to_two(tmp_path, pg_url):
    _one_holder_across_replicas(tmp_path, pg_url)


def test_database_gone_leaves_the_lease_as_this_replica_last_knew_it(tmp_path, pg_url):
    central = CentralProc(tmp_path, db=pg_url, extra=FAST).start()
    try:
        site = central.account("cluster", "gone-site")
        assert report(central, site, "gw-a", 18900, [model("echo")], decide=True)["decider"] == "gw-a"
        assert report(central, site, "gw-b", 19000, [model("echo")], decide=True)["decider"] == "gw-a"
        asyncio.run(_pg(f"DROP DATABASE {pg_url.rsplit('/', 1)[1]} WITH (FORCE)"))
        # Reports go on (credentials checked a moment ago need no database); the lease stays put.
        assert report(central, site, "gw-b", 19000, [model("echo")], decide=True)["decider"] == "gw-a"
        assert report(central, site, "gw-a", 18900, [model("echo")], decide=True)["decider"] == "gw-a"
        assert report(central, site, "gw-c", 19100, [model("echo")])["decider"] == "gw-a"
        assert "decision lease of cluster 'gone-site' unchanged" in central.log.read_text()
    finally:
        central.stop()


# ---------------------------------------------------------------------------------- fail-over


def test_a_device_whose_gateway_is_killed_finishes_on_the_routes_next_gateway(tmp_path, model_repo):
    central = CentralProc(tmp_path / "central", extra=FAST).start()
    central.account("cluster", "fo-site")
    device = central.account("device", "fo-cam")
    gateways = [
        LocalCluster(
            tmp_path / gid,
            name="fo-site",
            central_urls=[central.url],
            central_password=PW,
            gateway_args=["--gateway-id", gid],
        )
        for gid in ("gw-1", "gw-2")
    ]
    client = None
    try:
        for g in gateways:
            g.start()
            g.add_worker("echo", repo=model_repo)  # one worker of its own each
        for g in gateways:
            g.wait_workers("echo", 1)
        r = wait_for(
            lambda: a if len((a := route(central, device))["fallbacks"]) == 1 else None,
            "central never routed to both gateways",
        )
        assert {r["url"], *r["fallbacks"]} == {g.url for g in gateways}
        x = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}
        client = Client(central.url, *device, timeout=5.0)
        first = client.infer("echo", x)  # the route is cached from here on
        before = routes_answered(central)

        def kill(url: str) -> None:
            victim = next(g for g in gateways if g.url == url)
            assert victim.gateway is not None
            victim.gateway.signal(signal.SIGKILL)
            victim.gateway.popen.wait(10)

        async def asynchronously() -> Any:
            async with AsyncClient(central.url, *device, timeout=5.0) as ac:
                # The same device's route (central would spread a second route to the other gateway).
                ac.core.routes[("echo", None)] = dataclasses.replace(client.core.routes[("echo", None)])
                kill(first.gateway)
                return await ac.infer("echo", x)

        after = asyncio.run(asynchronously())
        assert after.gateway != first.gateway and after.outputs["y"].tolist() == x["x"].tolist()
        again = client.infer("echo", x)
        assert again.gateway == after.gateway and again.outputs["y"].tolist() == x["x"].tolist()
        assert routes_answered(central) == before  # neither asked central again
        # The next requests go straight to the gateway that answered.
        assert client.route("echo").url == again.gateway
    finally:
        if client is not None:
            client.close()
        for g in gateways:
            g.stop()
        central.stop()
