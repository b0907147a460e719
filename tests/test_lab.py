"""The lab (``shoal lab``): the checker's rules on made-up logs, and, where network namespaces can be
made (root, ``ip``), the CI-sized scenario across emulated machines (a worker's machine partitioned
and healed, a gateway's machine crashed under the devices' load: nothing lost, failed or wrong, each
fault detected and recovered), a lab interrupted with Ctrl+C leaving nothing behind, and a killed
lab's leftovers removed at the next start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from waiting import wait_for

from shoal.lab import checker
from shoal.lab.world import clean_stale, lab_namespaces, unavailable

WHY = unavailable()
needs_netns = pytest.mark.skipif(WHY is not None, reason=f"the lab needs network namespaces: {WHY}")

GW = {"http://a:8000": "gw-a", "http://b:8000": "gw-b"}


def _req(rid: str, sent: float, done: float | None, gw: str = "http://a:8000", out: str | None = None, **kw):
    lines = [{"e": "send", "id": rid, "t": sent, "in": f"in-{rid}"}]
    if done is not None:
        ok = kw.get("ok", True)
        d = {"e": "done", "id": rid, "t": done, "ok": ok}
        if ok:
            d |= {"gateway": gw, "out": out or f"in-{rid}", "correct": out is None}
        else:
            d["error"] = "InferError: gave up"
        lines.append(d)
    return lines


def test_checker_counts_lost_twice_failed_and_wrong_answers():
    log = [
        *_req("r1", 0.0, 0.1),
        *_req("r2", 0.0, None),  # never answered
        *_req("r3", 0.0, 0.2, ok=False),  # failed, and the device saw it
        *_req("r4", 0.0, 0.3, out="in-r1"),  # another request's data
        *_req("r5", 0.0, 0.3, out="garbage"),  # nobody's
        *_req("r6", 0.0, 0.1),
        {
            "e": "done",
            "id": "r6",
            "t": 0.2,
            "ok": True,
            "gateway": "http://b:8000",
            "out": "in-r6",
            "correct": True,
        },
    ]
    s = checker.check(log, [], [], GW)
    assert (s["requests"], s["answered"], s["failed"], s["lost"]) == (6, 4, 1, 1)
    assert (s["answered_twice"], s["wrong_answers"], s["foreign_answers"]) == (1, 2, 1)
    assert not checker.passed(s)
    clean = checker.check(_req("r1", 0.0, 0.1) + _req("r2", 0.1, 0.2, gw="http://b:8000"), [], [], GW)
    assert checker.passed(clean) and clean["answered_by"] == {"gw-a": 1, "gw-b": 1}


def _gw(t: float, source: str, workers: dict[str, int] | None) -> dict:
    """A gateway sample: worker -> links (all accepting), or None for a gateway that did not answer."""
    if workers is None:
        return {"t": t, "source": source, "ok": False}
    return {
        "t": t,
        "source": source,
        "ok": True,
        "workers": {w: {"accepting": True, "links": n} for w, n in workers.items()},
    }


def test_checker_times_detection_and_recovery_per_fault():
    # A worker partitioned at 10 (healed at 16): gw-a drops it at 14, gw-b at 15, both hold it at 17.
    # gw-a crashed at 20: the workers link to one gateway at 24, central drops it at 21.5.
    samples = []
    for t in range(0, 31):
        w1 = {"w1": 2 if t < 20 else 1, "w2": 2 if t < 24 else 1}
        if 14 <= t < 17:
            w1.pop("w1")
        b = dict(w1)
        if t == 14:
            b["w1"] = 2
        samples.append(_gw(t, "gw-a", w1 if t < 20 else None))
        samples.append(_gw(t + 0.01, "gw-b", b))
        samples.append(
            {"t": t + 0.5, "source": "central", "ok": True, "gateways": {"gw-a": t < 21, "gw-b": True}}
        )
    log = []
    for i in range(300):  # one request every 0.1 s, 20 ms each; those in flight at the crash take 5 s
        sent = i * 0.1
        held = 19.9 <= sent < 20.0
        log += _req(
            f"r{i}",
            sent,
            sent + (5.0 if held else 0.02),
            gw="http://b:8000" if sent >= 20 or held else "http://a:8000",
        )
    faults = [
        {"kind": "partition", "machine": "w1", "label": "partition(w1)", "start": 10.0, "heal": 16.0},
        {"kind": "crash", "machine": "gw-a", "label": "crash(gw-a)", "start": 20.0},
    ]
    s = checker.check(log, samples, faults, GW, warm=1.0)
    part, crash = s["faults"]
    approx = lambda *x: pytest.approx(x, abs=0.02)  # noqa: E731 (samples of gw-b come 10 ms later)
    assert (part["detected_s"], part["detected_by_all_s"], part["recovered_s"]) == approx(4.0, 5.0, 1.0)
    assert part["held_up_requests"] == 0 and part["devices_recovered_s"] == 0.0
    assert (crash["detected_s"], crash["central_dropped_s"]) == approx(4.0, 1.5)
    assert crash["held_up_requests"] == 1 and crash["recovered_s"] == pytest.approx(4.9, abs=0.01)
    assert crash["its_share_before"] == 1.0 and crash["answers_from_it_after"] == 0
    assert crash["survivors_share_after"] == 1.0
    assert list(s["phases"]) == [
        "warm-up",
        "before",
        "partition(w1)",
        "between 1 and 2",
        "crash(gw-a)",
        "after",
    ]
    # Issue 23's target for a gateway's machine lost: the devices carry on within 3 s. Here the
    # requests in flight at the crash waited 5 s: every rule but that one holds.
    assert crash["target_s"] == 3.0 and crash["within_target"] is False and "within_target" not in part
    assert not checker.passed(s)
    # The same request from a device behind an edge link: its own link's retransmissions are no
    # fail-over's, so it is given apart and the target is judged on the others.
    (_, crash_edge) = checker.check(log, samples, faults, GW, warm=1.0, edge_devices={"r199"})["faults"]
    assert crash_edge["within_target"] and crash_edge["edge_longest_held_s"] == pytest.approx(5.0)
    crash["within_target"] = True
    assert checker.passed(s)


def test_checker_rows_of_dropped_packets_a_slow_link_and_a_worker_lost_while_draining():
    # w1's packets dropped at 10 (healed at 16): gw-a holds it as not accepting from 11.5 to 16.5.
    # w2's link slow from 20 to 30: it answers 1 request a second there, 3 before.
    # w3 started at 40, joined at 41, drained at 43, lost at 43.1; its requests went elsewhere 1.6 s on.
    samples, served = [], {"w1": 0, "w2": 0, "w3": 0}
    for i in range(0, 500):
        t = i / 10
        served["w1"] += 1
        served["w2"] += 1 if 20 <= t < 30 else 3
        ws = {
            "w1": {"accepting": not 11.5 <= t < 16.5, "links": 2, "in_flight": 0, "served": served["w1"]},
            "w2": {"accepting": True, "links": 2, "in_flight": 0, "served": served["w2"]},
        }
        if 41 <= t < 48:
            served["w3"] += 1 if t < 43 else 0
            ws["w3"] = {"accepting": t < 43, "links": 2, "in_flight": 1, "served": served["w3"]}
        samples.append({"t": t, "source": "gw-a", "ok": True, "workers": ws})
    log = []
    for i in range(500):
        log += _req(f"r{i}", i / 10, i / 10 + 0.02)
    back = {"gw-a": [{"after_s": 1.6, "requests": 2, "how": "silent"}]}
    faults = [
        {"kind": "drop", "machine": "w1", "label": "drop(w1)", "start": 10.0, "heal": 16.0},
        {"kind": "slow", "machine": "w2", "label": "slow(w2)", "start": 20.0, "heal": 30.0},
        {
            "kind": "crash-draining",
            "machine": "w3",
            "label": "crash-draining(w3)",
            "started": 40.0,
            "drain": 43.0,
            "held_at_drain": 2,
            "start": 43.1,
            "handed_back": back,
        },
    ]
    s = checker.check(log, samples, faults, GW, warm=1.0)
    drop, slow, lost = s["faults"]
    assert (drop["detected_s"], drop["recovered_s"]) == pytest.approx((1.5, 0.5), abs=0.02)
    assert slow["dropped_s"] is None and slow["recovered_s"] == 0.0
    assert slow["its_share_before"] == pytest.approx(0.75, abs=0.02)
    assert slow["its_share_during"] == pytest.approx(0.5, abs=0.02)
    assert lost["joined_s"] == pytest.approx(1.0) and lost["served_before_lost"] > 0
    assert lost["detected_s"] == 1.6 and lost["lost_after_drain_s"] == pytest.approx(0.1)
    assert lost["held_at_drain"] == 2 and lost["handed_back"] == back
    assert checker.passed(s)


def test_netem_loses_delays_in_order_and_queues_at_its_rate():
    import random

    from shoal.lab.netem import Direction, Profile, due

    d = Direction("a->b", 0, 0)
    p = Profile(delay_ms=10.0, jitter_ms=5.0, loss=0.2)
    rng = random.Random(1)
    times = [due(p, rng, d, i * 0.001, 100) for i in range(2000)]
    kept = [t for t in times if t is not None]
    assert 0.17 < d.lost / 2000 < 0.23 and len(kept) + d.lost == 2000
    assert kept == sorted(kept)  # jitter never reorders
    assert all(t - i * 0.001 >= 0 for i, t in enumerate(times) if t is not None)
    slow = Direction("b->a", 0, 0)
    narrow = Profile(rate_mbit=1.0, queue_ms=100.0)  # 1500-byte frames: 12 ms each
    at = [due(narrow, rng, slow, 0.0, 1500) for _ in range(20)]
    assert at[:9] == pytest.approx([0.012 * (i + 1) for i in range(9)])
    assert at[9:] == [None] * 11 and slow.dropped == 11  # queued past 100 ms: dropped


@needs_netns
def test_link_faults_on_two_machines(tmp_path):
    """Dropped packets leave the link up and say nothing; a lossy link delays and loses frames and
    TCP gets everything through; a narrow one takes its time; each ends cleanly."""
    import socket
    import threading
    import time

    from shoal.lab.faults import LOSSY
    from shoal.lab.world import BRIDGE, World, claim_run, enter

    w = World(claim_run()).create()
    try:
        a, b = w.add("a"), w.add("b")
        ready = threading.Event()

        def server() -> None:
            enter(b.ns)
            with socket.create_server((b.address, 9999)) as s:
                ready.set()
                c, _ = s.accept()
                while data := c.recv(65536):
                    c.sendall(data)

        threading.Thread(target=server, daemon=True).start()
        ready.wait(10)
        out: dict = {}

        def client() -> None:
            enter(a.ns)
            c = socket.create_connection((b.address, 9999), timeout=10)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def echo(n: int) -> float:
                t = time.perf_counter()
                c.sendall(b"x" * n)
                got = 0
                while got < n:
                    got += len(c.recv(1 << 20))
                return time.perf_counter() - t

            out["base"] = min(echo(100) for _ in range(20))
            ready_file = tmp_path / "netem.ready"
            p = subprocess.Popen(
                w.in_machine(BRIDGE, [sys.executable, "-m", "shoal.lab.netem", "--taps", ",".join(w.taps("a"))])
                + ["--delay-ms", str(LOSSY["delay_ms"]), "--loss", "0.05", "--ready", str(ready_file)]
                + ["--stats", str(tmp_path / "netem.json")]
            )
            try:
                wait_for(ready_file.exists, "shoal.lab.netem never started")
                w.impair("a")
                out["lossy"] = sorted(echo(100) for _ in range(40))
                out["lossy_1mb"] = echo(1_000_000)
                w.unimpair("a")
            finally:
                p.terminate()
                p.wait(10)
            out["frames"] = json.loads((tmp_path / "netem.json").read_text())
            w.set_rate("a", 1.0)
            out["narrow_200kb"] = echo(200_000)
            w.set_rate("a", None)
            w.set_dropping("a", True)
            c.sendall(b"z")
            c.settimeout(1.0)
            try:
                out["while_dropped"] = c.recv(1)
            except TimeoutError:
                out["while_dropped"] = None
            link = subprocess.run(["ip", "-n", a.ns, "link", "show", "eth0"], capture_output=True, text=True)
            out["link_up"] = "LOWER_UP" in link.stdout and "blackhole" in link.stdout
            w.set_dropping("a", False)
            c.settimeout(10.0)
            out["after"] = c.recv(1)  # retransmitted once the packets pass again

        th = threading.Thread(target=client)
        th.start()
        th.join(60)
        assert not th.is_alive()
    finally:
        w.release()
    assert out["lossy"][0] >= 2 * LOSSY["delay_ms"] / 1000 > out["base"]  # a round trip crosses it twice
    lost = sum(x["lost"] for x in out["frames"].values())
    assert lost > 0 and out["lossy_1mb"] < 30  # frames lost, every byte there
    assert 1.2 < out["narrow_200kb"] < 5  # 200 KB = 1.6 Mbit each way at 1 Mbit/s, pipelined
    assert out["while_dropped"] is None and out["link_up"] and out["after"] == b"z"


def test_checker_judges_the_wan_and_routes_by_the_cluster_the_faults_hit():
    """With a second site, a route for the first site's model names the first site's gateways only:
    'routes complete' counts those, and answers from a cluster not serving a model are counted."""
    gws = {**GW, "http://c:8000": "gw-c"}
    clusters = {"site": {"model": "echo", "gateways": ["gw-a", "gw-b"]}, "site-2": {"model": "echo-b", "gateways": ["gw-c"]}}
    samples = []
    for i in range(40):
        t = i / 2
        samples.append({"t": t, "source": "central-1", "ok": True, "gateways": {"gw-a": True, "gw-b": True, "gw-c": True}})
        samples.append({"t": t, "source": "route-central-1", "ok": True, "code": 200, "gateways": list(GW)})
        samples.append({"t": t, "source": "site-2-route-central-1", "ok": True, "code": 200, "gateways": ["http://c:8000"]})
    log = []
    for i in range(40):
        log += _req(f"a{i}", i / 2, i / 2 + 0.01)
        b = _req(f"b{i}", i / 2, i / 2 + 0.01, gw="http://c:8000")
        b[0]["model"] = "echo-b"
        log += b
    log[0]["model"] = "echo"
    wrong = _req("x", 1.0, 1.1, gw="http://c:8000")  # echo answered by the other site's gateway
    wrong[0]["model"] = "echo"
    faults = [{"kind": "wan", "machine": "wan", "label": "wan(wan)", "start": 5.0, "heal": 10.0}]
    s = checker.check(log + wrong, samples, faults, gws, 0.0, clusters)
    (wan,) = s["faults"]
    assert wan["central_listed_live"] == 1.0 and wan["routes_complete"] == 1.0, wan
    assert s["wrong_cluster"] == 1 and not checker.passed(s)
    site2 = s["sites"]["site-2"]
    assert site2["answered"] == 40 and site2["routes_to_it"] == 1.0 and site2["central_listed_live"] == 1.0


def test_checker_follows_devices_to_the_other_site_when_a_clusters_last_gateway_is_lost():
    gws = {**GW, "http://c:8000": "gw-c"}
    clusters = {
        "site": {"model": "echo", "models": ["echo"], "gateways": ["gw-a", "gw-b"]},
        "site-2": {"model": "echo-b", "models": ["echo-b", "echo"], "gateways": ["gw-c"]},
    }
    samples = []
    for i in range(40):
        t = i / 2
        live = {"gw-a": t < 13.5, "gw-b": t < 6, "gw-c": True}
        samples.append({"t": t, "source": "central-1", "ok": True, "gateways": live})
        for g, up in (("gw-a", t < 12), ("gw-b", t < 5)):
            samples.append(_gw(t, g, {"w1": 1} if up else None))
    log = []
    for i in range(40):
        t = i / 2
        gw = "http://a:8000" if t < 12 else "http://c:8000"
        log += _req(f"r{i}", t, t + (2.5 if t == 11.5 else 0.01), gw=gw)  # held at the loss, then gw-c
    faults = [
        {"kind": "crash", "machine": "gw-b", "label": "crash(gw-b)", "start": 5.0},
        {"kind": "serve", "machine": "w7", "label": "serve(w7)", "start": 8.0, "serving": 9.0},
        {"kind": "crash", "machine": "gw-a", "label": "crash(gw-a)", "start": 12.0},
    ]
    s = checker.check(log, samples, faults, gws, 0.0, clusters)
    _, serve, last = s["faults"]
    assert serve["serving_s"] == 1.0 and serve["recovered_s"] == 1.0
    assert last["detected_s"] == last["central_dropped_s"] == 1.5
    assert last["survivors_share_after"] == 1.0 and last["longest_held_s"] == pytest.approx(2.5)
    assert last["within_target"] and s["faults"][0]["within_target"]
    assert s["wrong_cluster"] == 0 and checker.passed(s)


def test_checker_reads_a_second_site_workers_fault_from_its_own_gateway():
    """A worker of the second site lost: detected when that site's gateway drops it (the first site's
    gateways never held it), and the requests it held counted as any fault's."""
    gws = {**GW, "http://c:8000": "gw-c"}
    clusters = {
        "site": {"model": "echo", "gateways": ["gw-a", "gw-b"], "workers": ["w1", "w2"]},
        "site-2": {"model": "echo-b", "gateways": ["gw-c"], "workers": ["w5", "w6"]},
    }
    samples = []
    for i in range(60):
        t = i / 2
        samples.append(_gw(t, "gw-a", {"w1": 2, "w2": 2}))
        samples.append(_gw(t, "gw-c", {"w6": 1} if t >= 11.5 else {"w5": 1, "w6": 1}))
    log = []
    for i in range(60):
        t = i / 2
        b = _req(f"b{i}", t, t + (1.6 if t == 10.0 else 0.01), gw="http://c:8000")
        b[0]["model"] = "echo-b"
        log += b + _req(f"a{i}", t, t + 0.01)
    faults = [{"kind": "crash", "machine": "w5", "label": "crash(w5)", "start": 10.0}]
    s = checker.check(log, samples, faults, gws, 0.0, clusters)
    (row,) = s["faults"]
    assert row["site"] == "site-2" and row["detected_s"] == row["detected_by_all_s"] == 1.5
    assert row["held_up_requests"] == 1 and row["longest_held_s"] == pytest.approx(1.6)
    assert "within_target" not in row and checker.passed(s)


def test_checker_gives_each_link_profiles_devices_their_own_latency():
    lan = [x for i in range(100) for x in _req(f"l{i}", i / 10, i / 10 + 0.01)]
    lte = [x for i in range(100) for x in _req(f"e{i}", i / 10, i / 10 + (2.5 if i == 50 else 0.07))]
    quiet = checker.quiet_windows(
        {"before": {"from_s": 0.0, "to_s": 4.9}, "crash(gw-b)": {"from_s": 4.9, "to_s": 6.0},
         "after": {"from_s": 6.0, "to_s": 11.0}},
        0.0,
    )  # fmt: skip
    assert quiet == [(0.0, 4.9), (6.0, 11.0)]
    rows = checker.by_profile({"lan": lan, "lte": lte}, quiet)
    assert rows["lan"]["p50_ms"] == pytest.approx(10.0) and rows["lte"]["p50_ms"] == pytest.approx(70.0)
    assert rows["lte"]["longest_s"] == 2.5 and rows["lte"]["p99_ms"] > 70.0
    assert rows["lte"]["between_faults_p99_ms"] == pytest.approx(70.0)  # the request the fault held is not
    assert rows["lte"]["requests"] == rows["lte"]["answered"] == 100 and rows["lte"]["failed"] == 0


def test_federation_checker_times_the_lost_sites_rounds():
    from shoal.lab.federation import check_federation, federation_passed

    sites = ["site-a", "site-b", "site-c"]
    rounds = [
        {"round": 1, "sites": sites, "time": 10.0},
        {"round": 2, "sites": ["site-a", "site-c"], "time": 32.0},  # site-b lost at 12
        {"round": 3, "sites": ["site-a", "site-c"], "time": 52.0},  # back at 33, refused for a while
        {"round": 4, "sites": sites, "time": 70.0},
        {"published": "models/mnist-fused/1", "metric": {"accuracy": 0.9}},
    ]
    fault = {"machine": "site-b", "start": 12.0, "heal": 33.0}
    row = check_federation(rounds, fault, sites)
    assert row["rounds"] == 4 and row["rounds_without_it"] == [2, 3]
    assert row["first_round_without_it_s"] == 20.0
    assert (row["back_in_round"], row["back_in_a_round_s"]) == (4, 37.0)
    assert row["others_in_every_round"] and row["final"]["metric"]["accuracy"] == 0.9
    assert federation_passed(row, 4) and not federation_passed(row, 5)
    never = check_federation(rounds[:3], fault, sites)
    assert never["back_in_round"] is None and not federation_passed(never, 3)


@pytest.mark.slow
@needs_netns
def test_ci_scenario_loses_nothing_and_recovers_from_each_fault(tmp_path):
    from shoal.lab.run import LabConfig, run_lab

    s = run_lab(LabConfig(out=tmp_path, seed=1))
    assert s["requests"] > 500
    for k in ("failed", "lost", "answered_twice", "answers_never_sent", "wrong_answers", "wrong_cluster"):
        assert s[k] == 0, (k, s["first_failures"])
    # The second site, its own cluster and model, reaching central over a WAN (100 ms, 1 % loss,
    # 10 Mbit/s): its devices are routed to it for its model and served throughout; central lists it.
    site2 = s["sites"]["site-2"]
    assert site2["answered"] > 100 and site2["failed"] == 0, site2
    assert s["answered_by"].get("gw-c") == site2["answered"], s["answered_by"]
    assert site2["routes_asked"] > 0 and site2["routes_to_it"] == 1.0, site2
    assert site2["central_listed_live"] >= 0.9, site2
    part, drop, joining, draining, gw_part, central_lost, db_restart, crash = s["faults"]
    # The worker's machine cut off silently: the gateways notice (their dead-after is 5 s) and take
    # it back once the link returns.
    assert part["detected_s"] is not None and part["detected_s"] < 10, part
    assert part["recovered_s"] is not None and part["recovered_s"] < 10, part
    # Every packet of the other worker's machine dropped, its link up: the same, and what it held
    # is sent elsewhere after 1.5 heartbeats of silence.
    assert drop["detected_s"] is not None and drop["recovered_s"] is not None, drop
    assert drop["longest_held_s"] < 3.0, drop
    # A worker lost while taking its first batches, and one lost while it drains: what each held
    # goes to the other workers within 3 s (before the fix, a draining one's waited 5 to 6 s).
    for lost in (joining, draining):
        assert lost["joined_s"] is not None, lost
        assert sum(h["requests"] for hs in lost["handed_back"].values() for h in hs) > 0, lost
        assert all(h["after_s"] < 3.0 for hs in lost["handed_back"].values() for h in hs), lost
        assert lost["longest_held_s"] < 3.0, lost
    assert draining["held_at_drain"] > 0 and draining["served_before_lost"] > 0, draining
    # A gateway's machine cut off silently: the devices carry on through the other gateway within
    # 3 s; healed, the workers link to it again and central names it in its routes again.
    assert gw_part["longest_held_s"] < 3.0 and gw_part["recovered_s"] < 10, gw_part
    assert gw_part["in_routes_s"] is not None and gw_part["in_routes_s"] < 10, gw_part
    # A central replica's machine lost: the other answers every route asked of it.
    routes = central_lost["routes_by_survivors"]
    assert routes["asked"] > 0 and routes["answered"] == routes["asked"], central_lost
    assert central_lost["held_up_requests"] == 0, central_lost
    # PostgreSQL killed and started again: the devices never notice; the replicas answer again.
    assert db_restart["held_up_requests"] == 0 and db_restart["recovered_s"] < 10, db_restart
    # The gateway's machine lost while it carried devices: they carry on through the other within
    # issue 23's 3 s (the requests in flight there wait NEXT_GATEWAY_AFTER_S, 2 s, then the other).
    assert crash["its_share_before"] > 0, crash
    assert crash["within_target"] and crash["longest_held_s"] <= 3.0, crash
    assert crash["detected_s"] is not None and crash["detected_s"] < 15, crash
    assert crash["recovered_s"] < 30 and crash["answers_from_it_after"] == 0, crash
    assert crash["survivors_share_after"] == 1.0, crash
    assert s["passed"]
    assert json.loads((tmp_path / "summary.json").read_text())["faults"] == s["faults"]
    assert (tmp_path / "timeline.png").stat().st_size > 10_000
    assert s["run"] not in lab_namespaces()  # torn down


@pytest.mark.slow
@needs_netns
def test_ctrl_c_tears_the_lab_down(tmp_path):
    clean_stale()  # a lab killed outright earlier: its run number would be taken again
    before = set(lab_namespaces())
    p = subprocess.Popen(
        [sys.executable, "-m", "shoal", "lab", "--out", str(tmp_path)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert p.stderr is not None
        for line in p.stderr:  # the deployment is up: processes on every machine
            if line.startswith("deployed"):
                break
        else:
            pytest.fail("the lab never said it was deployed")
        # Keep reading what it says: a full pipe would hold its teardown's own lines (and it).
        threading.Thread(target=p.stderr.read, daemon=True).start()
        mine = set(lab_namespaces()) - before
        assert len(mine) == 1
        p.send_signal(signal.SIGINT)
        assert p.wait(180) == 130  # the teardown stops every machine of the larger world, by id
    finally:
        if p.poll() is None:
            p.kill()
    assert not (set(lab_namespaces()) & mine)


@needs_netns
def test_a_killed_lab_is_cleaned_at_the_next_start(tmp_path):
    from shoal.lab.world import World, claim_run, clean_stale

    # A lab process that claims a run, builds a machine, starts a process in it and is then killed.
    code = (
        "import subprocess, sys, time; from shoal.lab.world import World, claim_run;"
        "w = World(claim_run()).create(); m = w.add('m');"
        "subprocess.Popen(['ip', 'netns', 'exec', m.ns, 'sleep', '600']);"
        "print(w.run, m.ns, flush=True); time.sleep(600)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    run, ns = p.stdout.readline().split()
    pids = wait_for(
        lambda: subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split(),
        "the process in the machine",
    )
    p.kill()
    p.wait()
    assert int(run) in lab_namespaces()
    assert int(run) in clean_stale()
    assert int(run) not in lab_namespaces()
    for pid in pids:
        wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _zombie(pid), f"process {pid} gone")
    World(claim_run(int(run))).release()  # the run number is free again


def _zombie(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_schedule_is_drawn_from_the_seed():
    from shoal.lab.faults import ci_schedule, full_schedule

    assert ci_schedule(3) == ci_schedule(3) != ci_schedule(4)
    kinds = [(f.kind, f.machine) for f in ci_schedule(3)]
    assert kinds == [
        ("partition", "w1"),
        ("drop", "w2"),
        ("crash-joining", "w3"),
        ("crash-draining", "w4"),
        ("partition", "gw-a"),
        ("crash", "central-1"),
        ("restart", "db"),
        ("crash", "gw-b"),
    ]
    assert 6.5 <= ci_schedule(3)[0].seconds <= 7.5
    full = [(f.kind, f.machine) for f in full_schedule(3)]
    assert full == [
        *kinds[:4],
        ("lossy", "w1"),
        ("slow", "w2"),
        ("partition", "w6"),
        ("crash", "w5"),
        kinds[4],
        ("wan", "wan"),
        *kinds[5:7],
        ("partition", "db"),
        kinds[7],
        ("serve", "w7"),
        ("crash", "gw-a"),
    ]


# ------------------------------------------------------------------ the Ray scenario (shoal lab --scenario ray)


def _gw_sample(t: float, **workers: tuple[bool, str | None]) -> dict:
    ws = {w: {"accepting": a, "in_flight": 0, "served": 0, "machine": m} for w, (a, m) in workers.items()}
    return {"source": "gw", "t": t, "ok": True, "workers": ws}


def test_ray_checker_rows_of_a_node_lost_and_the_head_restarted():
    from shoal.lab import ray_check

    log = [
        *_req("d/0/0", 99.0, 99.1), *_req("d/0/1", 101.0, 102.7),  # held by the lost node's worker
        *_req("d/1/0", 100.0, 100.1), *_req("d/1/1", 110.5, 110.6), *_req("d/1/2", 111.0, 111.1),
        *_req("d/1/3", 115.0, 130.0, ok=False),
    ]  # fmt: skip
    samples = [
        _gw_sample(100.5, a=(True, "ray-1"), b=(True, "ray-head")),
        _gw_sample(101.5, a=(True, None), b=(True, "ray-head")),  # its process gone: machine unknown
        _gw_sample(102.6, a=(False, None), b=(True, "ray-head")),
        _gw_sample(105.0, c=(True, "ray-2"), b=(True, "ray-head")),
        _gw_sample(111.0, c=(True, "ray-2")),
        _gw_sample(125.0, c=(True, "ray-2"), d=(True, "ray-head")),
        {"source": "procs", "t": 112.0, "ok": True, "processes": {"ray-head": 0}, "gateway_alive": True},
    ]
    faults = [
        {"kind": "ray-node-crash", "machine": "ray-1", "label": "ray-node-crash(ray-1)", "start": 101.0,
         "workers": ["a"], "killed": 6},
        {"kind": "ray-head-restart", "machine": "ray-head", "label": "ray-head-restart(ray-head)",
         "start": 110.0, "heal": 120.0, "head_up": 123.0, "workers": ["b"], "killed": 9},
    ]  # fmt: skip
    s = ray_check.check_act("ft", log, samples, faults, warm=99.5)
    crash, head = s["faults"]
    assert crash["detected_s"] == 1.6 and crash["back_s"] == 4.0
    assert crash["replaced_on"] == {"b": "ray-head", "c": "ray-2"} and crash["restarted_by_ray"] is False
    assert crash["held_up_requests"] == 1 and crash["longest_held_s"] == 1.7
    assert head["head_up_s"] == 13.0 and head["sent_while_away"] == 3 and head["answered_while_away"] == 2
    assert head["failed_while_away"] == 1 and head["fewest_workers"] == 1 and head["gateway_alive"] is True
    assert head["back_s"] == 15.0 and head["head_worker_back_s"] == 15.0
    assert s["failed"] == 1 and not s["passed"]  # a failure with GCS on Redis fails the act

    lost = {"kind": "ray-head-crash", "machine": "ray-head", "label": "ray-head-crash(ray-head)", "start": 101.0}
    samples = [
        _gw_sample(102.0, c=(True, "ray-2")),
        {"source": "gw", "t": 170.0, "ok": False, "error": "refused"},
        {"source": "procs", "t": 150.0, "ok": True, "processes": {"ray-2": 0, "gw": 3}, "gateway_alive": True},
        {"source": "procs", "t": 171.0, "ok": True, "processes": {"ray-2": 0, "gw": 0}, "gateway_alive": False},
    ]
    s = ray_check.check_act("no-ft", log, samples, [lost], warm=99.5)
    row = s["faults"][0]
    assert row["served_until_s"] == 10.1 and row["first_failure_s"] == 29.0
    assert row["gateway_status_lost_s"] == 69.0 and row["gateway_exited_s"] == 70.0
    assert row["node_processes_gone_s"] == {"ray-2": 49.0, "gw": 70.0}
    assert s["passed"]  # without GCS fault tolerance failures are measured, not a fail: none lost or twice


@pytest.mark.slow
@needs_netns
@pytest.mark.skipif(
    os.environ.get("SHOAL_LAB_RAY") != "1", reason="the Ray scenario takes minutes and four Ray nodes: SHOAL_LAB_RAY=1"
)
def test_ray_scenario_a_node_and_the_head_lost(tmp_path):
    """``shoal lab --scenario ray`` (both acts, about six minutes on two cores): with the GCS on Redis,
    a node's machine lost and the head's restarted fail no request; without it, nothing is lost or
    answered twice, whatever fails."""
    pytest.importorskip("ray")
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "lab", "--scenario", "ray", "--out", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    ft = s["acts"]["ft"]
    crash, head = ft["faults"]
    assert ft["failed"] == ft["lost"] == ft["answered_twice"] == ft["wrong_answers"] == 0
    assert crash["back_s"] is not None and crash["back_s"] < 10.0  # issue 23: replaced within 10 s
    assert crash["longest_held_s"] < 3.0
    assert head["failed_while_away"] == 0 and head["gateway_alive"] and head["head_worker_back_s"] is not None
    no = s["acts"]["no-ft"]
    assert no["lost"] == no["answered_twice"] == no["wrong_answers"] == 0
    for a in (ft, no):  # a gateway whose Ray head is lost still ends when told to stop
        assert a["gateway_stop"]["how"] == "exit status 0" and a["gateway_stop"]["seconds"] < 30
    assert lab_namespaces() == {} or all(run != s.get("run") for run in lab_namespaces())
