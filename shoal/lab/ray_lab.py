"""``shoal lab --scenario ray``: a cluster whose workers are Ray actors on a Ray cluster of three
machines, and the Ray faults: a node's machine lost, the head's machine lost with and without GCS
fault tolerance.

Two acts, each a world of its own (built, loaded, faulted, checked, torn down):

* ``ft``: the head's control store (GCS) on a Redis server on a machine of its own.
  ``ray-node-crash``: the machine of a node (not the head) that hosts a worker is lost (link down,
  every process in it SIGKILLed); its actor's requests must go elsewhere, and the worker count come
  back on the surviving nodes. Then ``ray-head-restart``: the head's machine lost the same way, and
  after ``head_down_s`` its link up and ``ray start --head`` again, as before; the workers on the
  other nodes must keep serving through it, and the actor that was on the head come back.
* ``no-ft``: the GCS in the head's memory (Ray's default). ``ray-head-crash``: the head's machine
  lost for good, and the lab watches for ``no_ft_watch_s`` what goes on serving and for how long.

Machines: ``central`` (SQLite), ``gw`` (``shoal cluster`` with ``autoscale.engine: ray``, and a Ray
node without CPUs: a driver needs a raylet of its machine), ``ray-head``, ``ray-1``, ``ray-2`` (one
CPU each: one worker each), ``redis`` (``ft`` only), ``dev`` (the devices, ``shoal.lab.device``
through central). Everything a run writes is under ``<out>/<act>/``; the summary of both acts in
``<out>/summary.json``.
"""

from __future__ import annotations

import atexit
import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from shoal.lab import ray_check
from shoal.lab.deploy import CENTRAL_PORT, GRPC_PORT, HTTP_PORT, MODEL, WORKER_PORT
from shoal.lab.device import LogTail
from shoal.lab.observe import LabCentral, LabGateway, Observer, gateway_sample
from shoal.lab.procs import Processes, wait_ports
from shoal.lab.ray_nodes import REDIS_SERVER, RayCluster, machine_of, machine_pids, netns_inodes
from shoal.lab.run import handed_back
from shoal.lab.world import World, claim_run

HEAD, NODES, GW, CENTRAL, DEV, REDIS = "ray-head", ["ray-1", "ray-2"], "gw", "central", "dev", "redis"
CLUSTER = "site"
MIN_WORKERS, MAX_WORKERS = 2, 3
SLOW_S = 1.0


@dataclass
class RayLabConfig:
    out: Path
    seed: int = 1
    run: int | None = None
    devices: int = 2
    in_flight: int = 4
    client_timeout: float = 10.0
    acts: tuple[str, ...] = ("ft", "no-ft")
    pause_s: float = 3.0  # steady load before each fault
    head_down_s: float = 10.0  # how long the head's machine is away (ft)
    no_ft_watch_s: float = 150.0  # how long the lost head's cluster is watched (no-ft): past Ray's 60 s GCS timeouts
    recover_timeout_s: float = 90.0
    tail_s: float = 5.0
    ray_env: dict[str, str] = field(default_factory=dict)  # Ray's settings (RAY_*) for every node


def _wait(cond: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(every)
    return True


def processes_sample(world: World, gateway: Any) -> dict[str, Any]:
    """How many processes run on each Ray machine, and whether the gateway's process still runs."""
    counts = {m: len(machine_pids(world.machines[m].ns)) for m in (HEAD, *NODES, GW)}
    return {"processes": counts, "gateway_alive": gateway.alive()}


class RayLab:
    def __init__(self, cfg: RayLabConfig, say: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.say = say
        self.world: World | None = None
        self.procs: Processes | None = None
        self.observer: Observer | None = None
        self.ray: RayCluster | None = None

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        cfg.out.mkdir(parents=True, exist_ok=True)
        acts = {}
        for act in cfg.acts:
            acts[act] = self.act(act)
        summary = {
            "scenario": "ray",
            "seed": cfg.seed,
            "acts": acts,
            "passed": all(a["passed"] for a in acts.values()),
        }
        (cfg.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def act(self, act: str) -> dict[str, Any]:
        out = self.cfg.out / act
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        self.world = World(claim_run(self.cfg.run))
        atexit.register(self.teardown)
        try:
            return self._act(act, out)
        finally:
            self.teardown()
            atexit.unregister(self.teardown)

    # ------------------------------------------------------------------------------------ one act

    def _act(self, act: str, out: Path) -> dict[str, Any]:
        cfg = self.cfg
        ft = act == "ft"
        world = self.world
        assert world is not None
        t = time.monotonic()
        world.create()
        for name in (CENTRAL, GW, HEAD, *NODES, DEV, *([REDIS] if ft else [])):
            world.add(name)
        self.procs = procs = Processes(world, out / "logs")
        self.observer = obs = Observer(world.bridge_ns)
        self.ray = ray = RayCluster(
            world, procs, out, HEAD, list(NODES), GW, REDIS if ft else None, dict(cfg.ray_env)
        )
        self.say(f"[{act}] lab run {world.run}: {len(world.machines)} machines; starting Ray ({ray.address})")
        ray.start()
        self.say(f"[{act}] Ray up in {time.monotonic() - t:.1f} s: head {HEAD}, nodes {', '.join(NODES)}, {GW}")

        central = self._central(out)
        devices = [f"cam-{i}" for i in range(cfg.devices)]
        password = secrets.token_hex(8)
        for d in devices:
            obs.call(central.add_account, "device", d, password)
        gw = self._gateway(out, central)
        obs.call(central.wait_routable, {CLUSTER}, MODEL, 120)
        self.say(f"[{act}] gateway serving with {MIN_WORKERS} Ray workers, {time.monotonic() - t:.1f} s after the start")

        inodes = netns_inodes(world)
        obs.watch(GW, partial(gateway_sample, gw, partial(machine_of, inodes=inodes)), 0.1)
        assert gw.gateway is not None
        obs.watch("procs", partial(processes_sample, world, gw.gateway), 0.5)

        log = out / "device.jsonl"
        dev = procs.spawn(
            DEV,
            "dev",
            [
                sys.executable, "-m", "shoal.lab.device", "--central", central.url, "--device", ",".join(devices),
                "--in-flight", str(cfg.in_flight), "--timeout", str(cfg.client_timeout), "--seed", str(cfg.seed),
                "--log", str(log),
            ],  # fmt: skip
            {"SHOAL_DEVICE_PASSWORD": password},
        )
        tail = LogTail(log)
        if not _wait(lambda: len(tail.read().answered) == len(devices) or not dev.alive(), 60):
            raise RuntimeError(f"the devices got no answers within 60 s:\n{dev.tail()}")

        def steady(since: float = 0.0, avoid: str | None = None) -> bool:
            s = obs.latest(GW)
            if not s or not s["ok"]:
                return False
            ws = [w for w in s["workers"].values() if w["accepting"] and w["machine"] not in (None, avoid)]
            return len(ws) >= MIN_WORKERS and self._flowing(tail, since)

        if not _wait(steady, cfg.recover_timeout_s):
            raise RuntimeError("the deployment did not become steady under the devices' load")
        warm = time.time()
        self.say(f"[{act}] steady under load ({cfg.devices} devices x {cfg.in_flight} in flight)")
        records: list[dict[str, Any]] = []
        if ft:
            time.sleep(cfg.pause_s)
            victim = self._node_with_worker(obs)
            self.say(f"[{act}] fault: ray-node-crash({victim})")
            rec = self._crash_node(victim)
            records.append(rec)
            ok = _wait(lambda: steady(rec["start"], victim), cfg.recover_timeout_s)
            self.say(f"  {'recovered' if ok else 'NOT recovered'} {time.time() - rec['start']:.1f} s after it began")
            if not _wait(steady, cfg.recover_timeout_s):
                self.say("  not steady before the next fault; going on")
            time.sleep(cfg.pause_s)
            self.say(f"[{act}] fault: ray-head-restart({HEAD}, {cfg.head_down_s:g} s)")
            rec = self._restart_head()
            records.append(rec)
            ok = _wait(lambda: steady(rec["start"]), cfg.recover_timeout_s)
            self.say(f"  {'recovered' if ok else 'NOT recovered'} {time.time() - rec['start']:.1f} s after it began")
        else:
            time.sleep(cfg.pause_s)
            self.say(f"[{act}] fault: ray-head-crash({HEAD}), watched {cfg.no_ft_watch_s:g} s")
            start = time.time()
            killed = ray.crash(HEAD)
            records.append({"kind": "ray-head-crash", "machine": HEAD, "label": f"ray-head-crash({HEAD})",
                            "start": start, "killed": len(killed)})  # fmt: skip
            time.sleep(cfg.no_ft_watch_s)
        time.sleep(cfg.tail_s)
        gw_log = out / "logs" / f"{GW}.log"
        for i, rec in enumerate(records):
            hi = records[i + 1]["start"] if i + 1 < len(records) else time.time()
            for wid in rec.get("workers", []):
                rec.setdefault("handed_back", {})[wid] = handed_back(gw_log, wid, rec["start"], hi)
        procs.stop([dev], timeout=3 * cfg.client_timeout)
        obs.stop()
        stopped = self._stop_gateway(gw)
        self.say(f"[{act}] the gateway stopped {stopped['seconds']} s after its SIGTERM ({stopped['how']})")

        samples = list(obs.samples)
        entries = ray_check.read_jsonl(log)
        summary = ray_check.check_act(
            act, entries, samples, records, warm, gateway_url=gw.url, min_workers=MIN_WORKERS,
            gateway_log=ray_check.gateway_log_lines(gw_log),
        )  # fmt: skip
        summary["gateway_stop"] = stopped
        (out / "faults.json").write_text(json.dumps(records, indent=1))
        with open(out / "samples.jsonl", "w") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    # ------------------------------------------------------------------------------------ pieces

    def _flowing(self, tail: LogTail, since: float) -> bool:
        tail.read()
        now = time.time()
        oldest = tail.oldest()
        return (oldest is None or (oldest >= since and now - oldest < SLOW_S)) and now - tail.last_answer < 1.0

    def _central(self, out: Path) -> LabCentral:
        assert self.world is not None and self.procs is not None
        cdir = out / CENTRAL
        cdir.mkdir(parents=True, exist_ok=True)
        c = LabCentral(cdir, name=CENTRAL, host=self.world.machines[CENTRAL].address, http_port=CENTRAL_PORT)
        c.proc = self.procs.shoal(
            CENTRAL,
            CENTRAL,
            [
                "central", "--http", f"{c.host}:{CENTRAL_PORT}", "--db", f"sqlite:///{cdir / 'central.db'}",
                "--ports-file", str(cdir / "ports.json"), "--bootstrap-operator", c.operator,
                "--report-interval", "0.5",
            ],  # fmt: skip
            {"SHOAL_OPERATOR_PASSWORD": c.operator_password},
        )
        wait_ports(c.proc, cdir / "ports.json", 60)
        return c

    def _gateway(self, out: Path, central: LabCentral) -> LabGateway:
        """``shoal cluster`` on the gateway's machine, its workers Ray actors (``engine: ray``), once
        it holds ``MIN_WORKERS`` of them."""
        assert self.world is not None and self.procs is not None and self.observer is not None
        assert self.ray is not None
        host = self.world.machines[GW].address
        cluster_password = secrets.token_hex(12)
        self.observer.call(central.add_account, "cluster", CLUSTER, cluster_password)
        gdir = out / GW
        gdir.mkdir(parents=True, exist_ok=True)
        cfg = gdir / "gateway.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "autoscale": {
                        "engine": "ray",
                        "ray": {"address": self.ray.address, "namespace": "shoal-lab"},
                        "worker_gateway": f"{host}:{WORKER_PORT}",
                        "interval_s": 0.5,
                        "models": {MODEL: {"min": MIN_WORKERS, "max": MAX_WORKERS, "resources": {"cpus": 1}}},
                    }
                }
            )
        )
        secret, api_key = secrets.token_hex(16), secrets.token_hex(16)
        gw = LabGateway(gdir, name=CLUSTER, secret=secret, api_key=api_key, host=host, http_port=HTTP_PORT)
        gw.worker_port = WORKER_PORT
        gw.gateway = self.procs.shoal(
            GW,
            GW,
            [
                "cluster", "--name", CLUSTER, "--gateway-id", GW, "--config", str(cfg),
                "--http", f"0.0.0.0:{HTTP_PORT}", "--grpc", f"0.0.0.0:{GRPC_PORT}", "--workers", f"0.0.0.0:{WORKER_PORT}",
                "--advertise-workers", f"{host}:{WORKER_PORT}", "--public-url", gw.url, "--central", central.url,
                "--state-dir", str(gdir / "state"), "--ports-file", str(gdir / "ports.json"),
            ],  # fmt: skip
            {
                **self.ray.driver_env(),
                "SHOAL_CLUSTER_SECRET": secret,
                "SHOAL_API_KEYS": f"operator:{api_key}",
                "SHOAL_CENTRAL_PASSWORD": cluster_password,
            },
        )
        wait_ports(gw.gateway, gdir / "ports.json", 180)
        self.observer.call(gw.wait_workers, MODEL, MIN_WORKERS, 180, timeout=200)
        return gw

    def _stop_gateway(self, gw: LabGateway, grace_s: float = 60.0) -> dict[str, Any]:
        """SIGTERM to the gateway (its drain, then its engine's stop): how long it took to end, or
        SIGKILL after ``grace_s``."""
        assert gw.gateway is not None
        p = gw.gateway.popen
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        try:
            code = p.wait(grace_s)
            how = f"exit status {code}"
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
            how = f"still running after {grace_s:g} s: SIGKILL"
        return {"seconds": round(time.monotonic() - t, 2), "how": how}

    def _node_with_worker(self, obs: Observer) -> str:
        """A node other than the head hosting a worker (where a crash takes a worker with it)."""
        s = obs.latest(GW) or {"workers": {}}
        hosting = sorted({w["machine"] for w in s.get("workers", {}).values() if w["machine"] in NODES})
        if not hosting:
            raise RuntimeError(f"no worker on {', '.join(NODES)}: {s}")
        return hosting[0]

    def _workers_on(self, machine: str) -> list[str]:
        assert self.observer is not None
        s = self.observer.latest(GW) or {"workers": {}}
        return sorted(wid for wid, w in s.get("workers", {}).items() if w["machine"] == machine)

    def _crash_node(self, machine: str) -> dict[str, Any]:
        assert self.ray is not None
        workers = self._workers_on(machine)
        start = time.time()
        killed = self.ray.crash(machine)
        return {"kind": "ray-node-crash", "machine": machine, "label": f"ray-node-crash({machine})",
                "start": start, "workers": workers, "killed": len(killed)}  # fmt: skip

    def _restart_head(self) -> dict[str, Any]:
        assert self.ray is not None and self.world is not None
        workers = self._workers_on(HEAD)
        start = time.time()
        killed = self.ray.crash(HEAD)
        time.sleep(self.cfg.head_down_s)
        self.world.set_link(HEAD, True)
        heal = time.time()
        up = self.ray.restart_head()
        return {"kind": "ray-head-restart", "machine": HEAD, "label": f"ray-head-restart({HEAD})",
                "start": start, "heal": heal, "head_up": up, "workers": workers, "killed": len(killed)}  # fmt: skip

    def teardown(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer = None
        if self.procs is not None:
            self.procs.stop_all(timeout=10)
        if self.ray is not None:
            self.ray.stop()
            self.ray = None
        self.procs = None
        if self.world is not None:
            self.world.release()
            self.world = None


def run_ray_lab(cfg: RayLabConfig, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Both acts (``cfg.acts``); the summary (also in ``cfg.out / 'summary.json'``)."""
    return RayLab(cfg, say or (lambda s: None)).run()


def run_ray_cli(args: Any) -> int:
    """``shoal lab --scenario ray`` (from ``shoal.lab.cli``): both acts, a line a fault, or the whole
    summary with ``--json``; exit 0 when both acts pass."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # not imported here: only the machines run Ray
        print("shoal lab --scenario ray: Ray is not installed (pip install 'shoal[ray]')", file=sys.stderr)
        return 2
    if not Path(REDIS_SERVER).exists():
        print(f"shoal lab --scenario ray: {REDIS_SERVER} is missing (the GCS's store)", file=sys.stderr)
        return 2
    cfg = RayLabConfig(
        args.out, seed=args.seed, run=args.run, devices=args.devices, in_flight=args.in_flight,
        client_timeout=args.client_timeout,
    )  # fmt: skip
    summary = run_ray_lab(cfg, lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for act, a in summary["acts"].items():
            keys = ("requests", "answered", "failed", "lost", "answered_twice", "wrong_answers")
            print(f"[{act}] GCS in {a['gcs']}: " + ", ".join(f"{k} {a[k]}" for k in keys))
            for f in a["faults"]:
                print(f"  {f['fault']}: " + ", ".join(f"{k} {v}" for k, v in f.items() if k != "fault"))
            print(f"  passed: {a['passed']}")
        print(f"passed: {summary['passed']}; {args.out / 'summary.json'}")
    return 0 if summary["passed"] else 1
