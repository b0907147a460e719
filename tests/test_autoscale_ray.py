"""The Ray engine against a real Ray head on loopback: workers start as Ray actors and serve, scale-in
drains them and their actors end, an actor whose process is killed is restarted by Ray and serves
again under the same worker id (not replaced by another), an actor killed for good is an exit the
autoscaler replaces, and a worker no node can host is reported, not waited on for ever. One head and
one gateway for the whole file: Ray is heavy on two cores."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from test_autoscale import out_and_back_in
from test_model_names import _outside_model, assert_names_cannot_leave_the_repository
from waiting import wait_for

from shoal.autoscale.ray_engine import LocalRayHead, import_ray, placement_problem
from shoal.local import LocalCluster

NAMESPACE = "shoal-test"
GiB = 1024.0**3


def _nodes(**resources: float) -> list[dict]:
    return [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 8 * GiB, **resources}}]


def test_placement_problem_names_what_no_node_offers():
    assert placement_problem({"CPU": 1.0}, _nodes()) == ""
    assert placement_problem({"CPU": 1.0, "site-a": 1.0}, _nodes(**{"site-a": 2.0})) == ""
    why = placement_problem({"CPU": 1.0, "site-a": 1.0}, _nodes())
    assert why == 'no node offers {"site-a": 1}; Ray\'s autoscaler adds one if configured'
    assert placement_problem({"CPU": 4.0, "memory": 16 * GiB}, _nodes()).startswith(
        'no node offers {"cpus": 4, "memory_mb": 16384}'
    )
    two = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"GPU": 1.0}}]
    assert "no node offers all of" in placement_problem({"CPU": 1.0, "GPU": 1.0}, two)
    dead = [{"Alive": False, "Resources": {"CPU": 8.0}}]
    assert placement_problem({"CPU": 1.0}, dead).startswith("the cluster has no live node")


def test_a_gateway_that_cannot_reach_its_ray_cluster_says_so_and_exits(tmp_path):
    from shoal.autoscale.ray_engine import free_port

    cfg = tmp_path / "gw.yaml"
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    cfg.write_text(yaml.safe_dump({"autoscale": {"engine": "ray", "ray": {"address": address},
                                                 "models": {"echo": {}}}}))
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "cluster", "--config", str(cfg), "--http", "127.0.0.1:0",
         "--workers", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--no-auth", "--state-dir", "none"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "SHOAL_CLUSTER_SECRET": "x", "HOME": str(tmp_path)},
    )
    if importlib.util.find_spec("ray") is None:
        expected = "pip install 'shoal[ray]'"
    else:
        expected = f"cannot join the Ray cluster at '{address}': nothing answers there"
    assert r.returncode == 2 and expected in r.stderr, r.stdout + r.stderr


# ------------------------------------------------------------------------------ with a real head

# Whether Ray is installed, without importing it: it must only be imported after quiet_ray_env.
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install -e '.[ray]')"
)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = LocalRayHead(tmp_path_factory.mktemp("ray"), cpus=2)
    h.start()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def gateway(head, model_repo, tmp_path_factory):
    """A gateway whose autoscaler starts ``slow`` workers as actors of half a CPU each, and ``echo``
    workers only on nodes offering a ``site-a`` resource (none here)."""
    wd = tmp_path_factory.mktemp("gateway")
    cfg = wd / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({"autoscale": {
        "engine": "ray", "ray": {"address": head.address, "namespace": NAMESPACE}, "repo": str(model_repo),
        "interval_s": 0.25,
        "models": {
            "slow": {"min": 1, "max": 2, "scale_up_window_s": 0.5, "scale_down_window_s": 2, "cooldown_s": 1,
                     "resources": {"cpus": 0.5}},
            "echo": {"min": 1, "max": 1, "start_timeout_s": 3, "resources": {"custom": {"site-a": 1}}},
        },
    }}))
    lc = LocalCluster(wd, gateway_args=["--config", str(cfg)])
    lc.start(timeout=120)  # the gateway joins the Ray cluster before it answers
    yield lc
    lc.stop()


@pytest.fixture(scope="module")
def driver(head):
    """This process as a Ray driver of the same cluster, to look actors up."""
    ray = import_ray()
    ray.init(address=head.address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _workers(lc: LocalCluster, model: str = "slow") -> dict[str, dict]:
    return {w["worker_id"]: w for m in lc.status()["models"] if m["name"] == model for w in m["workers"]}


def _events(lc: LocalCluster, kind: str, since: float = 0.0, model: str = "slow") -> list[dict]:
    return [e for e in lc.status()["autoscale"]["events"]
            if e["model"] == model and e["kind"] == kind and e["time"] >= since]


def _actor_gone(ray, name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return True
    return False


@needs_ray
def test_workers_run_as_actors_serve_and_scale_in_drains_them(gateway, driver):
    lc = gateway
    lc.wait_workers("slow", 1, timeout=90)
    first = next(iter(_workers(lc)))
    actor = driver.get_actor(first, namespace=NAMESPACE)  # the worker is the actor named after it
    assert driver.get(actor.where.remote(), timeout=30)["pid"] == _workers(lc)[first]["pid"]
    with lc.client() as c:
        assert c.infer("slow", {"x": np.full((1, 1), 0.25, np.float32)})["y"][0, 0] == pytest.approx(0.25)

    assert out_and_back_in(lc, 2, timeout=90) == []  # a second actor, drained again: nothing lost
    assert len(_events(lc, "up")) >= 2 and len(_events(lc, "down")) >= 1
    st = lc.status()
    gone = [d for d in st["departed_workers"] if d["model"] == "slow"]
    assert gone and all(d["left"] == "worker said goodbye" for d in gone)  # drained, never dropped
    for d in gone:
        wait_for(lambda d=d: _actor_gone(driver, d["worker_id"]), f"actor {d['worker_id']} outlived its drain", 30)


@needs_ray
def test_a_killed_actor_is_restarted_by_ray_and_serves_again(gateway, driver):
    lc = gateway
    lc.wait_workers("slow", 1, timeout=90)
    wid, w = next(iter(_workers(lc).items()))
    killed_at = time.time()
    os.kill(w["pid"], signal.SIGKILL)  # the actor's process, as when its node dies
    back = wait_for(lambda: (x := _workers(lc).get(wid)) and x["accepting"] and x["pid"] != w["pid"] and x, "Ray did not restart the killed actor", 90)
    # Restarted by Ray, not replaced by the autoscaler while it was away.
    assert _events(lc, "up", since=killed_at) == []
    assert driver.get(driver.get_actor(wid, namespace=NAMESPACE).where.remote(), timeout=30)["pid"] == back["pid"]
    with lc.client() as c:
        assert c.infer("slow", {"x": np.full((1, 1), 0.5, np.float32)})["y"][0, 0] == pytest.approx(0.5)
    assert lc.status()["autoscale"]["models"]["slow:1"]["start_failures"] == 0


@needs_ray
def test_a_worker_no_node_can_host_is_reported_and_given_up(gateway, driver):
    lc = gateway
    m = wait_for(lambda: (x := lc.status()["autoscale"]["models"]["echo:1"])["start_failures"] >= 1 and x, "the unplaceable worker was not reported", 60)
    assert "did not join within 3 s" in m["last_error"]
    assert 'no node offers {"site-a": 1}' in m["last_error"]
    wid = m["last_error"].split()[1]
    wait_for(lambda: _actor_gone(driver, wid), "the actor that could not be placed was not removed", 30)
    assert lc.gateway.alive() and lc.live_workers("echo") == 0
    assert lc.status()["autoscale"]["models"]["slow:1"]["ready"] >= 1  # the others are not disturbed


@needs_ray
def test_an_actor_killed_for_good_is_an_exit_and_is_replaced(gateway, driver):
    lc = gateway
    wait_for(lambda: len(ws := _workers(lc)) == 1 and next(iter(ws.values()))["accepting"], "not one worker", 90)
    wid = next(iter(_workers(lc)))
    driver.kill(driver.get_actor(wid, namespace=NAMESPACE), no_restart=True)  # as an operator might
    wait_for(lambda: (ws := _workers(lc)) and wid not in ws and any(w["accepting"] for w in ws.values()), "no new worker replaced the actor killed for good", 90)
    assert _actor_gone(driver, wid)
    with lc.client() as c:
        assert c.infer("slow", {"x": np.full((1, 1), 0.75, np.float32)})["y"][0, 0] == pytest.approx(0.75)


@needs_ray
def test_no_model_name_leaves_the_repository_on_the_ray_engine(gateway, model_repo, tmp_path):
    """The names an outside test used to make a Ray worker import a handler from outside the
    repository: each is refused (400) before any engine sees it, and the handler is never imported."""
    marker = tmp_path / "imported"
    _outside_model(model_repo.parent / "other" / "pwn" / "1", marker)  # "../other/pwn" from the repository
    assert_names_cannot_leave_the_repository(gateway.http_port, gateway.api_key, model_repo, marker)
    assert gateway.gateway.alive()


# ------------------------------------------------------------------ found by shoal lab --scenario ray


def test_the_driver_attaches_to_the_node_of_its_own_machine():
    """The gateway's driver names its own node (the local address towards the head): Ray, left to
    choose, picks among every raylet in the process table and prefers the head's, so where machines
    share one (the lab's namespaces) the gateway depended on the head's machine."""
    from shoal.autoscale.ray_engine import local_address_towards

    assert local_address_towards("127.0.0.1:6379") == "127.0.0.1"
    assert local_address_towards("auto") is None
    assert local_address_towards("ray://head:10001") is None


class _FakeRay:
    """What ``RayWorker.exit_code`` asks of Ray, for an actor whose ping failed with ``error``."""

    class exceptions:  # noqa: N801 (Ray's own name)
        class RayError(Exception):
            pass

        class RayActorError(RayError):
            pass

    def __init__(self, error: Exception | None, answer: tuple[int, str] = (0, "")) -> None:
        self.error, self.answer = error, answer

    def wait(self, refs, timeout=0):
        return refs, []

    def get(self, ref, timeout=0):
        if ref == "where":
            return {"node": "n1"}
        if self.error is not None:
            raise self.error
        return self.answer


def _ray_worker(fake: _FakeRay):
    from shoal.autoscale.ray_engine import RayWorker

    class Engine:
        ray = fake
        killed: list = []

        def kill_soon(self, w):
            self.killed.append(w)

    return RayWorker("w1", None, "ping", "where", {"CPU": 1.0}, Engine())


def test_an_actor_that_died_is_not_a_model_that_failed_to_start():
    """A Ray actor that died (its node or its driver's node lost, killed) ends with -1, which the
    controller replaces without counting it towards marking the model unavailable; a worker whose
    model did not load still ends with its own status. (In the lab, the head's restart killed the
    actors three times in a row and the model was marked unavailable for good.)"""
    dead = _FakeRay(_FakeRay.exceptions.RayActorError("The actor died unexpectedly before finishing this task."))
    w = _ray_worker(dead)
    assert w.exit_code() == -1 and "died unexpectedly" in w.describe()["error"]
    w = _ray_worker(_FakeRay(None, (2, "no such model")))
    assert w.exit_code() == 2 and w.describe()["error"] == "no such model"


def test_a_gateway_stops_in_bounded_time_when_its_ray_head_is_lost():
    """With the head lost, each of Ray's calls waits for its control store (a minute or more): the
    engine's stop gives up waiting after its timeout (the calls go on in a daemon thread) instead of
    keeping the stopping gateway alive; in the lab it outlived its SIGTERM."""
    import asyncio
    import threading

    from shoal.autoscale.config import AutoscaleConfig
    from shoal.autoscale.ray_engine import RayEngine

    never = threading.Event()

    class Stuck(_FakeRay):
        def kill(self, actor, no_restart=True):
            never.wait(30)

        def shutdown(self):
            never.wait(30)

    engine = RayEngine(AutoscaleConfig(engine="ray"))
    engine.ray = Stuck(None)
    w = _ray_worker(engine.ray)
    w.engine = engine
    import atexit

    atexit.register(engine.ray.shutdown)  # as ray.init registers it
    unregistered = []
    real = atexit.unregister
    atexit.unregister = lambda f: (unregistered.append(f), real(f))
    try:
        t = time.monotonic()
        asyncio.run(engine.stop([w], timeout_s=0.5))
    finally:
        atexit.unregister = real
    assert time.monotonic() - t < 3.0 and w.code is None  # not waited for; the thread goes on
    # and Ray's exit hook, which would wait for it at the interpreter's exit, is gone
    assert unregistered == [engine.ray.shutdown]
    never.set()


def test_the_engine_stop_kills_the_actors_and_leaves_when_ray_answers():
    import asyncio

    from shoal.autoscale.config import AutoscaleConfig
    from shoal.autoscale.ray_engine import RayEngine

    calls = []

    class Answers(_FakeRay):
        def kill(self, actor, no_restart=True):
            calls.append(("kill", actor, no_restart))

        def shutdown(self):
            calls.append(("shutdown",))

    engine = RayEngine(AutoscaleConfig(engine="ray"))
    engine.ray = Answers(None)
    w = _ray_worker(engine.ray)
    asyncio.run(engine.stop([w], timeout_s=5))
    assert calls == [("kill", None, True), ("shutdown",)] and w.code == -9


def test_calls_into_ray_never_hold_the_process_exit():
    """Ray's calls run in daemon threads (``off_loop``), not the default executor whose threads the
    process joins at exit: a call stuck on a lost head no longer keeps a stopped gateway alive."""
    code = (
        "import asyncio, threading, time\n"
        "from shoal.autoscale.ray_engine import off_loop\n"
        "async def main():\n"
        "    assert await off_loop(lambda x: x + 1, 1) == 2\n"
        "    asyncio.get_running_loop().create_task(off_loop(threading.Event().wait, 60))\n"
        "    await asyncio.sleep(0.1)\n"
        "asyncio.run(main())\n"
    )
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t < 20
