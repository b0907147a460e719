"""One lab run end to end: build the world, deploy, put the devices' load on it, inject the seeded
faults one after the other (each once the system is steady again), stop, check, plot, and tear
everything down whatever happens (an exception, Ctrl+C, SIGTERM turned into one by the command).

What a run writes to its folder: ``summary.json`` (the checker's), ``timeline.png``,
``faults.json`` (the records, wall clock), ``samples.jsonl`` (the observer's), ``device.jsonl``
(the devices' log) and each process's log under ``logs/``.
"""

from __future__ import annotations

import atexit
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from shoal.lab import checker
from shoal.lab.deploy import MODEL, WORKER_PORT, Deployment, SiteSpec, deploy
from shoal.lab.device import LogTail
from shoal.lab.faults import CRASHES, SCENARIOS, Fault, inject, netem_on
from shoal.lab.observe import Observer, central_sample, gateway_sample, route_sample
from shoal.lab.pg import LabPostgres
from shoal.lab.plot import plot_timeline
from shoal.lab.procs import Processes
from shoal.lab.world import World, claim_run

CENTRALS = ["central-1", "central-2"]
GATEWAYS = ["gw-a", "gw-b"]
WORKERS = ["w1", "w2"]
# The second site: a cluster of its own (one gateway, two workers) serving a model of its own,
# reaching central through a WAN of its own (100 ms one way, 1 % loss, 10 Mbit/s, throughout), its
# devices on a machine of their own asking for that model.
SITE2 = SiteSpec("site-2", ["gw-c"], ["w5", "w6"], "echo-b", wan="wan-2", wan_mbit=10.0)
SITE2_DEVICES = "dev-2"
# Devices on machines of their own behind edge link profiles (``shoal.lab.netem`` on their path for
# the whole run; one rate both ways, the uplink's), asking for the first site's model through central
# like the devices on ``dev``: shoal bench edge's LTE and poor Wi-Fi, the harder two of its links.
EDGE = {
    "lte": {"delay_ms": 30.0, "jitter_ms": 8.0, "loss": 0.005, "rate_mbit": 8.0},
    "poor-wifi": {"delay_ms": 25.0, "jitter_ms": 15.0, "loss": 0.02, "rate_mbit": 3.0},
}
EDGE_DEVICES = 2  # device accounts behind each profile
EDGE_IN_FLIGHT = 2  # requests at once per device there


def edge_machine(profile: str) -> str:
    return f"dev-{profile.split('-')[-1]}"  # dev-lte, dev-wifi
PROBE = "probe"  # the device account the observer asks each replica for routes with
SLOW_S = 1.0  # a request outstanding longer than this holds the system from being steady
SLOW_MODEL_S = 0.8  # a batch of the workers the scale-out and drain faults start (they hold requests)
STARTED = ("crash-joining", "crash-draining")  # faults that start a worker on an idle machine first

SLOW_ECHO = f"""\"\"\"The lab's slow echo: the bundled echo model, {SLOW_MODEL_S} s a batch (the workers that the
scale-out and drain faults start and lose, so that they hold requests when it happens).\"\"\"

import os
import time

HOLD = os.environ.get("SHOAL_LAB_HOLD", "")  # while this file exists, a batch does not end


class Echo:
    def __init__(self, model_dir, manifest) -> None:
        self.manifest = manifest

    def __call__(self, inputs):
        time.sleep({SLOW_MODEL_S})
        while HOLD and os.path.exists(HOLD):
            time.sleep(0.01)
        return {{"y": inputs["x"]}}
"""


def lab_repo(root: Path) -> Path:
    """The lab's model repository: the bundled echo model's manifest with a slow handler
    (``SLOW_ECHO``), and ``SITE2.model``, the bundled echo under another name."""
    from shoal.worker.cli import bundled_repo

    echo = Path(bundled_repo()) / MODEL / "1"
    v = root / MODEL / "1"
    v.mkdir(parents=True, exist_ok=True)
    shutil.copy(echo / "manifest.json", v / "manifest.json")
    (v / "handler.py").write_text(SLOW_ECHO)
    v = root / SITE2.model / "1"
    v.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((echo / "manifest.json").read_text())
    (v / "manifest.json").write_text(json.dumps({**manifest, "name": SITE2.model}, indent=1))
    shutil.copy(echo / "handler.py", v / "handler.py")
    return root


@dataclass
class LabConfig:
    out: Path
    seed: int = 1
    scenario: str = "ci"  # the schedule: SCENARIOS[scenario](seed) ("ci" or "full")
    run: int | None = None  # the run number (addresses 10.77.<run>.N); the first free one by default
    devices: int = 4  # device accounts on the device machine, each its own client
    in_flight: int = 4  # requests at once per device
    client_timeout: float = 10.0  # the device client's timeout (its default)
    tail_s: float = 3.0  # steady seconds after the last fault
    recover_timeout_s: float = 45.0  # longest wait for a fault's recovery before going on
    second_site: bool = True  # SITE2 and its devices (SITE2_DEVICES)
    site2_devices: int = 2  # device accounts at the second site
    site2_in_flight: int = 1  # requests at once per device there
    edge: bool | None = None  # devices behind the EDGE link profiles (None: in the full scenario)
    schedule: list[Fault] = field(default_factory=list)  # default: the scenario's


def _wait(cond: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(every)
    return True


class Lab:
    def __init__(self, cfg: LabConfig, say: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.say = say
        self.world: World | None = None
        self.procs: Processes | None = None
        self.observer: Observer | None = None
        self.pg: LabPostgres | None = None
        self.down: set[str] = set()  # machines crashed
        self.dep: Deployment | None = None
        self.slow_repo: Path | None = None
        self.served: list[str] = []  # workers of the first site's model started at the second site

    # ------------------------------------------------------------------ conditions on the live system

    def _holding(self, dep: Deployment) -> bool:
        """Every gateway still up answers and holds every worker still up as accepting."""
        assert self.observer is not None
        for d in (dep, *dep.sites.values()):
            for g in d.gateways:
                if g in self.down:
                    continue
                s = self.observer.latest(g)
                if not s or not s["ok"]:
                    return False
                if any(
                    not (s["workers"].get(w) or {}).get("accepting") for w in d.workers if w not in self.down
                ):
                    return False
        return True

    def _flowing(self, tail: LogTail, since: float) -> bool:
        """The devices carry on: nothing sent before ``since`` is outstanding, nothing outstanding is
        older than SLOW_S, and answers came within the last second."""
        tail.read()
        now = time.time()
        oldest = tail.oldest()
        return (
            oldest is None or (oldest >= since and now - oldest < SLOW_S)
        ) and now - tail.last_answer < 1.0

    def _links_fewer(self, dep: Deployment) -> bool:
        """The workers the surviving gateways hold link to no gateway that is down."""
        assert self.observer is not None
        alive = len([g for g in dep.gateways if g not in self.down])
        for g in dep.gateways:
            s = self.observer.latest(g) if g not in self.down else None
            if s and s["ok"] and any((w["links"] or 0) > alive for w in s["workers"].values()):
                return False
        return True

    # ------------------------------------------------------------------ what the faults need (faults.Site)

    def _hold_file(self, machine: str) -> Path:
        return self.cfg.out / f"hold-{machine}"

    def start_worker(self, machine: str) -> None:
        """A worker of the slow echo (``SLOW_MODEL_S`` a batch, capacity 4) on ``machine``."""
        assert self.procs is not None and self.dep is not None and self.slow_repo is not None
        args = self.dep.worker_args(machine, "--repo", str(self.slow_repo), "--capacity", "4")
        env = {"SHOAL_CLUSTER_SECRET": self.dep.secret, "SHOAL_LAB_HOLD": str(self._hold_file(machine))}
        self.dep.workers[machine] = self.procs.shoal(machine, machine, args, env)

    def hold(self, machine: str, on: bool) -> None:
        f = self._hold_file(machine)
        if on:
            f.touch()
        else:
            f.unlink(missing_ok=True)

    def holds_requests(self, machine: str, served: int = 0, since: float = 0.0) -> bool:
        assert self.observer is not None and self.dep is not None
        held, answered = False, 0
        for g in self.dep.gateways:
            s = self.observer.latest(g)
            if s is not None and s["t"] < since:
                return False
            w = s["workers"].get(machine) if s and s["ok"] else None
            if w:
                held = held or w["in_flight"] > 0
                answered += w["served"]
        return held and answered >= served

    def wait(self, cond: Callable[[], bool], timeout: float) -> bool:
        return _wait(cond, timeout, every=0.02)

    def serve(self, machine: str) -> None:
        """A worker of the first site's model (the bundled echo) at the second site, on ``machine``;
        returns once the second site's gateways hold it and every replica routes the model there."""
        assert self.procs is not None and self.dep is not None and self.observer is not None
        d = self.dep.sites[SITE2.cluster]
        first = next(iter(d.gateways.values()))
        args = ["worker", "--gateway", f"{first.host}:{WORKER_PORT}", "--model", MODEL, "--worker-id", machine]
        d.workers[machine] = self.procs.shoal(machine, machine, args, {"SHOAL_CLUSTER_SECRET": d.secret})
        self.served.append(machine)
        if not _wait(lambda: self._holding(self.dep), 60):  # type: ignore[arg-type]
            raise RuntimeError(f"the second site's gateways did not take the worker on {machine}")
        for name, c in self.dep.centrals.items():
            if name not in self.down:  # a replica crashed earlier answers nothing
                self.observer.call(c.wait_routable, {SITE2.cluster}, MODEL, 60.0)

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        out = cfg.out
        out.mkdir(parents=True, exist_ok=True)
        for sub in ("logs", "models", *CENTRALS, *GATEWAYS):
            shutil.rmtree(out / sub, ignore_errors=True)
        for f in ("device.jsonl", "samples.jsonl", "faults.json", "summary.json", "timeline.png"):
            (out / f).unlink(missing_ok=True)
        for f in [*out.glob("hold-*"), *out.glob("device-*.jsonl")]:
            f.unlink()
        if cfg.scenario not in SCENARIOS:
            raise ValueError(f"scenarios are {', '.join(SCENARIOS)}: {cfg.scenario!r}")
        schedule = cfg.schedule or SCENARIOS[cfg.scenario](cfg.seed)
        run = claim_run(cfg.run)
        self.world = world = World(run)
        atexit.register(self.teardown)
        try:
            return self._run(world, schedule, out)
        finally:
            self.teardown()
            atexit.unregister(self.teardown)

    def _run(self, world: World, schedule: list[Fault], out: Path) -> dict[str, Any]:
        cfg = self.cfg
        t = time.monotonic()
        world.create()
        spare = [f.machine for f in schedule if f.kind in STARTED]  # idle until their fault
        site2 = [SITE2.wan or "", *SITE2.gateways, *SITE2.workers, SITE2_DEVICES] if cfg.second_site else []
        serving = [f.machine for f in schedule if f.kind == "serve"]  # at the second site, idle till then
        if serving and not cfg.second_site:
            raise ValueError("a serve step needs the second site")
        edge = list(EDGE) if (cfg.edge if cfg.edge is not None else cfg.scenario == "full") else []
        for name in ("db", *CENTRALS, "wan", *GATEWAYS, *WORKERS, "dev", *spare, *site2, *serving):
            world.add(name)
        for profile in edge:  # last: the other machines keep their addresses
            world.add(edge_machine(profile))
        self.slow_repo = lab_repo(out / "models")
        self.say(f"lab run {world.run}: bridge and {len(world.machines)} machines on 10.77.{world.run}.0/24")
        self.procs = procs = Processes(world, out / "logs")
        self.observer = obs = Observer(world.bridge_ns)
        devices = [f"cam-{i}" for i in range(cfg.devices)]
        devices2 = [f"cam-b{i}" for i in range(cfg.site2_devices)] if cfg.second_site else []
        edge_devices = {p: [f"cam-{edge_machine(p)[4:]}{i}" for i in range(EDGE_DEVICES)] for p in edge}
        self.pg = LabPostgres(world.machines["db"].address, f"10.77.{world.run}.0/24")
        dep = deploy(
            world,
            procs,
            obs,
            out,
            GATEWAYS,
            WORKERS,
            [*devices, *devices2, *(d for ds in edge_devices.values() for d in ds), PROBE],
            centrals=CENTRALS,
            pg=self.pg,
            wan="wan",
            sites=[SiteSpec(**{**asdict(SITE2), "repo": self.slow_repo})] if cfg.second_site else [],
        )
        self.dep = dep
        more = "".join(
            f"; {c}: {', '.join(d.gateways)}, {', '.join(d.workers)} ({d.model})" for c, d in dep.sites.items()
        )
        self.say(
            f"deployed in {time.monotonic() - t:.1f} s: PostgreSQL, {', '.join(CENTRALS)}, the WAN relay, "
            f"{', '.join(GATEWAYS)}, {', '.join(WORKERS)}{more}"
        )
        all_gateways = {g: gw for d in (dep, *dep.sites.values()) for g, gw in d.gateways.items()}
        for g, gw in all_gateways.items():
            obs.watch(g, partial(gateway_sample, gw), 0.1)
        for name, c in dep.centrals.items():
            obs.watch(name, partial(central_sample, c), 0.25)
            probe = partial(route_sample, c, PROBE, dep.devices[PROBE], MODEL)
            obs.watch(f"route-{name}", probe, 0.25)
            for cluster, d in dep.sites.items():  # a route for the other site's model, from each replica
                probe = partial(route_sample, c, PROBE, dep.devices[PROBE], d.model)
                obs.watch(f"{cluster}-route-{name}", probe, 0.25)

        log = out / "device.jsonl"
        dev = procs.spawn(
            "dev",
            "dev",
            [
                sys.executable,
                "-m",
                "shoal.lab.device",
                "--central",
                ",".join(dep.site_centrals),
                "--device",
                ",".join(devices),
                "--in-flight",
                str(cfg.in_flight),
                "--timeout",
                str(cfg.client_timeout),
                "--seed",
                str(cfg.seed),
                "--log",
                str(log),
            ],
            {"SHOAL_DEVICE_PASSWORD": dep.devices[devices[0]]},
        )
        drivers = [dev]
        logs = [log]
        for cluster, d in dep.sites.items():  # the other site's devices, through its own WAN to central
            log2 = out / f"device-{cluster}.jsonl"
            drivers.append(
                procs.spawn(
                    SITE2_DEVICES,
                    f"dev-{cluster}",
                    [
                        *[sys.executable, "-m", "shoal.lab.device", "--central", ",".join(d.site_centrals)],
                        *["--device", ",".join(devices2), "--in-flight", str(cfg.site2_in_flight)],
                        *["--timeout", str(cfg.client_timeout), "--seed", str(cfg.seed + 1000)],
                        *["--model", d.model, "--log", str(log2)],
                    ],
                    {"SHOAL_DEVICE_PASSWORD": dep.devices[devices[0]]},
                )
            )
            logs.append(log2)
        netems = []
        lan_logs = list(logs)  # the steady checks read these: an edge link's retransmissions are its own
        for i, (profile, ds) in enumerate(edge_devices.items()):  # behind their links from the start
            m = edge_machine(profile)
            child, stats = netem_on(world, procs, m, EDGE[profile], cfg.seed * 100 + i)
            netems.append((profile, child, stats))
            log_e = out / f"device-edge-{profile}.jsonl"
            drivers.append(
                procs.spawn(
                    m,
                    f"dev-edge-{profile}",
                    [
                        *[sys.executable, "-m", "shoal.lab.device", "--central", ",".join(dep.site_centrals)],
                        *["--device", ",".join(ds), "--in-flight", str(EDGE_IN_FLIGHT)],
                        *["--timeout", str(cfg.client_timeout), "--seed", str(cfg.seed + 2000 + i), "--log", str(log_e)],
                    ],
                    {"SHOAL_DEVICE_PASSWORD": dep.devices[devices[0]]},
                )
            )
            logs.append(log_e)
        everyone = LogTail(*logs)
        every = len(devices) + len(devices2) + sum(len(ds) for ds in edge_devices.values())
        if not _wait(lambda: len(everyone.read().answered) == every or not all(d.alive() for d in drivers), 60):
            raise RuntimeError(f"the devices got no answers within 60 s:\n{dev.tail()}")
        for d in drivers:
            if not d.alive():
                raise RuntimeError(f"the device driver exited:\n{d.tail()}")
        tail = LogTail(*lan_logs)
        self.say(
            f"devices answered: {cfg.devices} x {cfg.in_flight} in flight"
            + (f"; at {SITE2.cluster}: {len(devices2)} x {cfg.site2_in_flight}" if devices2 else "")
            + "".join(f"; behind {p}: {len(ds)} x {EDGE_IN_FLIGHT}" for p, ds in edge_devices.items())
        )

        def steady() -> bool:
            return self._holding(dep) and self._flowing(tail, 0.0)

        if not _wait(steady, cfg.recover_timeout_s):
            raise RuntimeError("the deployment did not become steady under the devices' load")
        warm = time.time()
        records = []
        for f in schedule:
            if not _wait(steady, cfg.recover_timeout_s):
                self.say("not steady before the next fault; going on")
            time.sleep(f.pause_s)  # the schedule's pause, drawn from the seed
            self.say(f"fault: {f.label}")
            rec = inject(f, world, procs, self)
            records.append(rec)
            if f.kind in CRASHES:
                self.down.add(f.machine)
            start = rec["start"]
            ok = _wait(
                lambda start=start: (
                    self._holding(dep) and self._links_fewer(dep) and self._flowing(tail, start)
                ),
                cfg.recover_timeout_s,
            )
            self.say(f"  {'recovered' if ok else 'NOT recovered'} {time.time() - start:.1f} s after it began")
        time.sleep(cfg.tail_s)  # steady load after the last fault: the 'after' phase
        for i, rec in enumerate(records):  # what the gateways did with the requests a lost worker held
            d = next((d for d in (dep, *dep.sites.values()) if rec["machine"] in d.workers), None)
            if d is not None and rec["kind"] not in ("lossy", "slow"):
                hi = records[i + 1]["start"] if i + 1 < len(records) else time.time()
                rec["handed_back"] = {
                    g: handed_back(out / "logs" / f"{g}.log", rec["machine"], rec["start"], hi)
                    for g in d.gateways
                }
        procs.stop(drivers, timeout=3 * cfg.client_timeout)
        procs.stop([c for _, c, _ in netems], timeout=5)  # their counters, written as they stop
        obs.stop()

        samples = list(obs.samples)
        gateways = {gw.url: g for g, gw in all_gateways.items()}
        entries = [e for path in logs for e in checker.read_jsonl(path)]
        clusters = {
            c: {"model": d.model, "models": [d.model], "gateways": sorted(d.gateways), "workers": sorted(d.workers)}
            for c, d in [(dep.cluster, dep), *dep.sites.items()]
        }
        if self.served:  # the second site served the first site's model too
            clusters[SITE2.cluster]["models"].append(MODEL)
        behind = {d for ds in edge_devices.values() for d in ds}
        summary = checker.check(entries, samples, records, gateways, warm, clusters, behind)
        reqs, _ = checker.pair_requests(entries)
        t0 = reqs[0]["sent"] if reqs else 0.0
        plot = plot_timeline(
            reqs,
            samples,
            records,
            list(all_gateways),
            t0,
            out / "timeline.png",
            f"shoal lab, seed {cfg.seed}: {', '.join(r['label'] for r in records)}",
        )
        if edge_devices:  # each link profile's devices, and the LAN's on dev for comparison
            groups = {"lan": checker.read_jsonl(log)}
            groups.update({p: checker.read_jsonl(out / f"device-edge-{p}.jsonl") for p in edge_devices})
            rows = checker.by_profile(groups, checker.quiet_windows(summary["phases"], t0))
            for profile, _, stats in netems:
                rows[profile]["link"] = EDGE[profile]
                if stats.exists():
                    rows[profile]["frames"] = json.loads(stats.read_text())
            summary["edge"] = rows
        summary = {
            "seed": cfg.seed,
            "run": world.run,
            "schedule": [asdict(f) for f in schedule],
            "devices": cfg.devices,
            "in_flight": cfg.devices * cfg.in_flight,
            **summary,
            "passed": checker.passed(summary),
            "timeline": str(plot),
        }
        (out / "faults.json").write_text(json.dumps(records, indent=1))
        with open(out / "samples.jsonl", "w") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def teardown(self) -> None:
        """Stop every process the lab started, delete its namespaces, give up its run number."""
        if self.observer is not None:
            self.observer.stop()
            self.observer = None
        if self.procs is not None:
            self.procs.stop_all(timeout=10)
            self.procs = None
        if self.world is not None:
            self.world.release()
            self.world = None
        if self.pg is not None:
            self.pg.remove()
            self.pg = None


HANDED_BACK = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*worker (\S+) (?:\(\S+\) silent for [\d.]+ s: (\d+) requests it held"
    r"|left with (\d+) requests in flight)"
)


def handed_back(log: Path, worker: str, lo: float, hi: float) -> list[dict[str, Any]]:
    """From a gateway's log: each time it sent what ``worker`` held to other workers between ``lo``
    and ``hi`` (wall clock): when (seconds after ``lo``), how many requests, and why (``silent``:
    after 1.5 heartbeats of silence; ``left``: dropped after its dead-after, or its link closed)."""
    out = []
    if not log.exists():
        return out
    for line in log.read_text(errors="replace").splitlines():
        m = HANDED_BACK.match(line)
        if not m or m.group(3) != worker:
            continue
        t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
        if lo <= t < hi:  # the same wall clock, to the millisecond
            silent = m.group(4) is not None
            n = int(m.group(4) if silent else m.group(5))
            out.append({"after_s": round(t - lo, 3), "requests": n, "how": "silent" if silent else "left"})
    return out


def run_lab(cfg: LabConfig, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the lab once; the checker's summary (also in ``cfg.out / 'summary.json'``)."""
    return Lab(cfg, say or (lambda s: None)).run()
