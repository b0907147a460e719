"""The local engine's pre-started interpreter (the zygote), attacked with real processes: killed in the
middle of a scale-out, inspected for the descriptors its workers inherit, and hit by Ctrl+C with the
rest of the gateway's process group. Linux only (``/proc``, pidfds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_autoscale import Load, _config
from waiting import wait_for

from shoal.autoscale.engines import ZYGOTE_ANSWER_S, zygote_restart_delay
from shoal.client.http import OipHttpClient

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _zygote(gateway: int) -> int:
    def find() -> int | None:
        for p in _children(gateway):
            try:
                if b"shoal.worker.zygote" in Path(f"/proc/{p}/cmdline").read_bytes():
                    return p
            except OSError:
                pass
        return None

    return wait_for(find, "the gateway started no zygote", 20)


def _channels(pid: int) -> set[str]:
    """The pipes and sockets a process holds, as ``pipe:[inode]`` / ``socket:[inode]``."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith(("pipe:", "socket:")):
            out.add(link)
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _session(sid: int) -> list[int]:
    """The running processes of a session (a gateway started with start_new_session and its children)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid and _running(int(name)):
                    out.append(int(name))
            except OSError:
                pass
    return out


def test_a_zygote_killed_during_a_scale_out_is_replaced_and_every_wanted_worker_serves_in_seconds(
    cluster, model_repo, tmp_path
):
    cfg = _config(
        tmp_path,
        model_repo,
        {"slow": {"min": 2, "max": 4, "scale_up_window_s": 0.5, "cooldown_s": 1, "scale_down_window_s": 60}},
    )
    lc = cluster(gateway_args=["--config", str(cfg)])
    lc.wait_workers("slow", 2)
    zygote = _zygote(lc.gateway.pid)
    serving = set(_children(zygote))
    load = Load(lc, 8)  # four workers' worth and more: the policy wants the maximum, 4
    try:
        starting = wait_for(lambda: set(_children(zygote)) - serving, "no scale-out under load", 30)
        killed = time.monotonic()
        os.kill(zygote, signal.SIGKILL)
        for pid in starting:  # the workers it was starting, half-way through loading their model
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: lc.live_workers("slow") >= 4, "the wanted workers did not all serve", 20)
        took = time.monotonic() - killed
    finally:
        load.end()
    print(f"all 4 workers served {took:.2f} s after the zygote was killed")
    # Product bound, kept: the issue asks for 3 s; measured 1.3-2.3 s here, of which the controller's
    # back-off after the killed starts (1 s for each in a row) is most. The bound leaves room for a busy
    # 2-core machine, and is half of ZYGOTE_ANSWER_S: a dead zygote waited out would take longer; before
    # the fix it took 80 s.
    assert took < ZYGOTE_ANSWER_S / 2
    assert load.failed == []
    engine = lc.status()["autoscale"]
    assert engine["zygote_pid"] not in (None, zygote) and engine["zygote_starts"] == 2


def test_a_forked_worker_holds_no_descriptor_of_the_zygote_so_cannot_forge_its_reports(
    cluster, model_repo, tmp_path
):
    cfg = _config(tmp_path, model_repo, {"echo": {"min": 1, "max": 1}})
    lc = cluster(gateway_args=["--config", str(cfg)])
    lc.wait_workers("echo", 1)
    zygote = _zygote(lc.gateway.pid)
    [worker] = _children(zygote)
    theirs = _channels(zygote)  # its command and report pipes to the engine
    assert len(theirs) >= 2
    assert _channels(worker) & theirs == set()


def test_ctrl_c_stops_an_autoscaling_gateway_and_all_its_workers_within_the_drain_time(model_repo, tmp_path):
    drain_s = 5.0
    cfg = _config(tmp_path, model_repo, {"echo": {"min": 3, "max": 3}}, drain_timeout_s=drain_s)
    ports = tmp_path / "ports.json"
    with open(tmp_path / "gateway.log", "wb") as out:
        gw = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shoal",
                "cluster",
                "--config",
                str(cfg),
                "--http",
                "127.0.0.1:0",
                "--workers",
                "127.0.0.1:0",
                "--no-auth",
                "--state-dir",
                "none",
                "--ports-file",
                str(ports),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "SHOAL_CLUSTER_SECRET": "s3cret", "ORT_DISABLE_TELEMETRY": "1"},
        )
    group: list[int] = []
    try:
        wait_for(ports.exists, "the gateway did not start", 30)
        url = f"http://127.0.0.1:{json.loads(ports.read_text())['http']}"

        def serving() -> int:
            with OipHttpClient(url) as c:
                _, st = c.get_json("/v2/status")
            return sum(w["accepting"] for m in st["models"] if m["name"] == "echo" for w in m["workers"])

        wait_for(lambda: serving() >= 3, "the workers did not start", 30)
        group = _session(gw.pid)
        assert len(group) >= 5  # the gateway, the zygote, three workers
        sent = time.monotonic()
        os.killpg(gw.pid, signal.SIGINT)  # what Ctrl+C in its terminal does
        wait_for(lambda: not [p for p in group if _running(p)], "processes still running after Ctrl+C", 30)
        took = time.monotonic() - sent
        assert gw.wait(5) == 0
        print(f"the gateway and its {len(group) - 1} processes stopped {took:.2f} s after Ctrl+C")
        assert took < drain_s  # product bound: within the drain time this test configures
        assert _session(gw.pid) == []  # none started meanwhile either
    finally:
        for pid in set(group + _session(gw.pid)):
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        gw.wait(10)


def test_a_child_whose_start_cannot_be_reported_never_becomes_a_worker(tmp_path):
    # The engine has gone (its end of the reports closed) when the zygote forks: the child must not
    # run, or it would serve with nobody to manage it (the same when the zygote is killed right
    # after the fork).
    zygote = subprocess.Popen(
        [sys.executable, "-m", "shoal.worker.zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        zygote.stdout.close()
        log = tmp_path / "worker.log"
        zygote.stdin.write(
            json.dumps({"argv": ["worker", "--help"], "env": {}, "log": str(log)}).encode() + b"\n"
        )
        zygote.stdin.flush()
        zygote.wait(60)
        assert not log.exists()
    finally:
        if zygote.poll() is None:
            zygote.kill()
        zygote.wait(10)


def test_a_zygote_that_keeps_dying_is_restarted_with_back_off():
    assert [zygote_restart_delay(n) for n in range(1, 10)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]
