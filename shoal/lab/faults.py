"""Faults and their schedule. A schedule is a list of ``Fault``s drawn from a seed (the same seed,
the same faults, pauses and lengths); ``inject`` carries one out on the lab's machines and records
when, by the wall clock the devices' logs use.

* ``partition(machine, seconds)``: the machine's own end of its link down, then up again after
  ``seconds``. Silent: nothing it sends leaves, nothing sent to it arrives, no FIN, no RST; its
  processes keep running.
* ``crash(machine)``: its link down, then every process the lab started on it SIGKILLed (in that
  order, so not even the kernel's resets of their connections get out); it stays down.
* ``restart(machine, seconds)``: every process the lab started on it SIGKILLed (its link stays up:
  the peers' connections are reset), started again as before after ``seconds`` (PostgreSQL stopped
  and started again).
* ``wan(machine, seconds)``: the WAN relay on ``machine`` switched to its profile (100 ms one way,
  1 % of segments lost once) for ``seconds``, then back to a LAN.
* ``drop(machine, seconds)``: every packet to and from the machine dropped for ``seconds``, its link
  staying up (``World.set_dropping``: no carrier lost, no route gone, no error to any process: the
  firewall-rule or dead-switch-port kind of partition).
* ``lossy(machine, seconds)``: the machine's link inside the site made slow and lossy for
  ``seconds`` (``LOSSY``: 10 ms one way, 3 ms jitter, 3 % of the frames lost each way, by
  ``shoal.lab.netem`` on its path).
* ``slow(machine, seconds)``: the machine's link narrowed to ``SLOW_MBIT`` each way (``tbf``, a
  200 ms queue) for ``seconds``.
* ``crash-joining(machine)``: a worker started on the idle machine (scale-out); once a gateway holds
  it with requests in flight (its first batch, held until then: ``Site.hold``), the machine crashed
  as ``crash`` does.
* ``serve(machine)``: not a fault: a worker started on the idle machine for the second site's second
  model (the first site's, ``echo``), so that a later fault can move devices to that site; done once
  central routes the model to it.
* ``crash-draining(machine)``: a worker started on the idle machine; once it has answered twice and
  holds requests (the batch it computes held until the loss), it is told to drain (SIGTERM, as an orchestrator's scale-in does: it tells every gateway DRAIN and
  finishes what it holds); once it says it is draining, the machine crashed.
"""

from __future__ import annotations

import json
import random
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from shoal.lab.procs import Processes
from shoal.lab.world import BRIDGE, World
from shoal.local import Child

KINDS = (
    "partition", "crash", "restart", "wan", "drop", "lossy", "slow", "crash-joining", "crash-draining", "serve",
)  # fmt: skip
LASTING = ("partition", "restart", "wan", "drop", "lossy", "slow")  # kinds that end after their seconds
CRASHES = ("crash", "crash-joining", "crash-draining")  # the machine stays down
CUT_OFF = ("partition", "drop")  # nothing gets through while it lasts
LOSSY = {"delay_ms": 10.0, "jitter_ms": 3.0, "loss": 0.03}  # a bad link inside the site
SLOW_MBIT = 0.25  # below what a worker's share of the devices' load needs (about 0.6 Mbit/s)
STEP_TIMEOUT_S = 30.0  # a worker started by a fault must join, serve, drain within this


class Site(Protocol):
    """What the scale-out and drain faults need of the running lab."""

    def start_worker(self, machine: str) -> None:
        """A worker on ``machine`` (idle so far), as the lab's other workers are started."""

    def holds_requests(self, machine: str, served: int = 0, since: float = 0.0) -> bool:
        """Some gateway holds the worker on ``machine`` with requests in flight, and the gateways
        have had at least ``served`` answers from it (by the gateways' samples taken after the wall
        clock's ``since``)."""

    def hold(self, machine: str, on: bool) -> None:
        """The batch the worker on ``machine`` computes does not end while ``on`` (it holds its
        requests until its machine is lost, whatever the timing of the lab's own steps)."""

    def wait(self, cond: Callable[[], bool], timeout: float) -> bool:
        """Until ``cond()``; False when ``timeout`` passed first."""

    def serve(self, machine: str) -> None:
        """A worker on ``machine`` (idle so far) for its site's second model; returns once the
        site's gateways hold it and central routes that model to the site too."""


@dataclass(frozen=True)
class Fault:
    kind: str
    machine: str
    pause_s: float  # after the system is steady again (the last fault recovered), before this one
    seconds: float = 0.0  # how long a partition lasts

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault kinds are {', '.join(KINDS)}: {self.kind!r}")

    @property
    def label(self) -> str:
        return (
            f"{self.kind}({self.machine}, {self.seconds:.1f} s)"
            if self.kind in LASTING
            else f"{self.kind}({self.machine})"
        )


def ci_schedule(seed: int) -> list[Fault]:
    """The CI-sized scenario: worker machine w1 partitioned for 6.5 to 7.5 s and healed; w2's packets
    dropped as long, its link up; a worker started on w3 (scale-out) and its machine crashed once it
    holds requests; a worker started on w4, drained and its machine crashed while it drains; gateway
    machine gw-a partitioned and healed; central replica central-1's machine crashed; PostgreSQL
    killed and started again 4 to 6 s later; gateway machine gw-b crashed (after gw-a's partition
    the devices' routes name gw-b first: the crash hits the gateway carrying the load, and the
    devices must carry on through the one that healed). A partition outlasts the dead-after (5 s,
    checked once a heartbeat, so up to 6 s): a shorter one heals before anyone notices."""
    rng = random.Random(seed)

    def pause() -> float:
        return round(rng.uniform(2.0, 4.0), 2)

    w1 = Fault("partition", "w1", pause_s=pause(), seconds=round(rng.uniform(6.5, 7.5), 2))
    gw_a = Fault("partition", "gw-a", pause_s=pause(), seconds=round(rng.uniform(6.5, 7.5), 2))
    central = Fault("crash", "central-1", pause_s=pause())
    db = Fault("restart", "db", pause_s=pause(), seconds=round(rng.uniform(4.0, 6.0), 2))
    gw_b = Fault("crash", "gw-b", pause_s=pause())
    more = random.Random(seed + 20_000)  # the faults added later: the ones above keep their draws
    w2 = Fault("drop", "w2", pause_s=round(more.uniform(2.0, 4.0), 2), seconds=round(more.uniform(6.5, 7.5), 2))
    joining = Fault("crash-joining", "w3", pause_s=round(more.uniform(1.0, 2.0), 2))
    draining = Fault("crash-draining", "w4", pause_s=round(more.uniform(1.0, 2.0), 2))
    return [w1, w2, joining, draining, gw_a, central, db, gw_b]


def full_schedule(seed: int) -> list[Fault]:
    """The fuller scenario: the CI one with w1's link made lossy (``LOSSY``) and w2's narrowed to
    ``SLOW_MBIT`` for 10 s each after the worker faults, then the second site's worker machines hit
    under its devices' load (w6 partitioned silently for 6.5 to 7.5 s and healed, then w5 crashed:
    its site serves on with w6 alone), the WAN between the site and central on for 10 s after the
    gateway's partition, the database machine partitioned silently for 6 to 8 s
    after PostgreSQL's restart, and at the end the second site made to serve the first site's model
    (``serve(w7)``) and the first site's last gateway crashed."""
    ci = ci_schedule(seed)
    rng = random.Random(seed + 10_000)
    wan = Fault("wan", "wan", pause_s=round(rng.uniform(2.0, 4.0), 2), seconds=10.0)
    db_cut = Fault(
        "partition", "db", pause_s=round(rng.uniform(2.0, 4.0), 2), seconds=round(rng.uniform(6.0, 8.0), 2)
    )
    lossy = Fault("lossy", "w1", pause_s=round(rng.uniform(2.0, 4.0), 2), seconds=10.0)
    slow = Fault("slow", "w2", pause_s=round(rng.uniform(2.0, 4.0), 2), seconds=10.0)
    # Then the second site serves the first site's model too, and the first site's last gateway is
    # lost: its devices must carry on at the other site.
    serve = Fault("serve", "w7", pause_s=1.0)
    last = Fault("crash", "gw-a", pause_s=round(rng.uniform(2.0, 4.0), 2))
    # The second site's workers (added later: the draws above stay as they were).
    site2 = random.Random(seed + 30_000)
    w6 = Fault("partition", "w6", pause_s=round(site2.uniform(2.0, 4.0), 2), seconds=round(site2.uniform(6.5, 7.5), 2))
    w5 = Fault("crash", "w5", pause_s=round(site2.uniform(2.0, 4.0), 2))
    return [*ci[:4], lossy, slow, w6, w5, ci[4], wan, *ci[5:7], db_cut, ci[7], serve, last]


SCENARIOS = {"ci": ci_schedule, "full": full_schedule}


def inject(fault: Fault, world: World, procs: Processes, site: Site | None = None) -> dict[str, Any]:
    """Carry the fault out (a lasting one blocks until it heals); its record."""
    rec: dict[str, Any] = {**asdict(fault), "label": fault.label}
    m = fault.machine
    if fault.kind == "partition":
        world.set_link(m, False)
        rec["start"] = time.time()
        time.sleep(fault.seconds)  # the fault's length, drawn from the seed
        world.set_link(m, True)
        rec["heal"] = time.time()
    elif fault.kind == "drop":
        world.set_dropping(m, True)
        rec["start"] = time.time()
        time.sleep(fault.seconds)
        world.set_dropping(m, False)
        rec["heal"] = time.time()
    elif fault.kind == "slow":
        world.set_rate(m, SLOW_MBIT)
        rec["start"] = time.time()
        rec["rate_mbit"] = SLOW_MBIT
        time.sleep(fault.seconds)
        world.set_rate(m, None)
        rec["heal"] = time.time()
    elif fault.kind == "lossy":
        rec.update(_lossy(fault, world, procs))
    elif fault.kind == "restart":
        rec["start"] = time.time()
        rec["killed_pids"] = procs.kill_machine(m)
        time.sleep(fault.seconds)
        rec["started_pids"] = [c.pid for c in procs.respawn(m)]
        rec["heal"] = time.time()
    elif fault.kind == "wan":
        procs.signal_machine(m, signal.SIGUSR1)
        rec["start"] = time.time()
        time.sleep(fault.seconds)
        procs.signal_machine(m, signal.SIGUSR2)
        rec["heal"] = time.time()
    elif fault.kind == "serve":
        if site is None:
            raise ValueError("serve needs the running lab")
        rec["start"] = time.time()
        site.serve(m)
        rec["serving"] = time.time()
    elif fault.kind in ("crash-joining", "crash-draining"):
        if site is None:
            raise ValueError(f"{fault.kind} needs the running lab")
        rec.update(_worker_lost(fault, world, procs, site))
    else:
        world.set_link(m, False)
        rec["start"] = time.time()
        rec["killed_pids"] = procs.kill_machine(m)
    return rec


def _lossy(fault: Fault, world: World, procs: Processes) -> dict[str, Any]:
    """``shoal.lab.netem`` on the machine's path for the fault's seconds."""
    m = fault.machine
    child, stats = netem_on(world, procs, m, LOSSY, int(fault.pause_s * 100))
    rec: dict[str, Any] = {"start": time.time(), "profile": dict(LOSSY)}
    time.sleep(fault.seconds)
    world.unimpair(m)
    rec["heal"] = time.time()
    procs.stop([child], timeout=5)
    if stats.exists():
        rec["frames"] = json.loads(stats.read_text())
    return rec


def netem_on(
    world: World, procs: Processes, m: str, profile: dict[str, float], seed: int
) -> tuple[Child, Path]:
    """``shoal.lab.netem`` started in the bridge's namespace with ``profile`` (``delay_ms``,
    ``jitter_ms``, ``loss``, ``rate_mbit``: its options) and put on the machine's path; the process
    and the file its counters go to when it is stopped. ``world.unimpair(m)`` takes it off again."""
    run_dir = procs.logs.parent
    ready, stats = run_dir / f"netem-{m}.ready", run_dir / f"netem-{m}.json"
    ready.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "shoal.lab.netem", "--taps", ",".join(world.taps(m)), "--ready", str(ready)]
    for k, v in profile.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    argv += ["--stats", str(stats), "--seed", str(seed)]
    child = procs.spawn(BRIDGE, f"netem-{m}", argv)
    end = time.monotonic() + STEP_TIMEOUT_S
    while not ready.exists():
        if not child.alive() or time.monotonic() > end:
            raise RuntimeError(f"shoal.lab.netem did not start:\n{child.tail()}")
        time.sleep(0.02)
    world.impair(m)
    return child, stats


DRAINING = re.compile(rb"draining: finishing (\d+) requests")


def _worker_lost(fault: Fault, world: World, procs: Processes, site: Site) -> dict[str, Any]:
    """A worker started on the machine, lost while joining (once a gateway holds it with requests in
    flight) or while draining (once it says it drains)."""
    m = fault.machine
    rec: dict[str, Any] = {"started": time.time()}
    joining = fault.kind == "crash-joining"
    site.hold(m, joining)  # joining: its first batch holds its requests until the machine is lost
    site.start_worker(m)
    served = 0 if joining else 2  # drained once it has served a little
    if not site.wait(lambda: site.holds_requests(m, served), STEP_TIMEOUT_S):
        raise RuntimeError(f"the worker on {m} never took requests:\n{procs.by_machine[m][-1].tail()}")
    if not joining:  # the batch it computes when told to drain holds its requests until the loss
        held_from = time.time()
        site.hold(m, True)
        if not site.wait(lambda: site.holds_requests(m, since=held_from), STEP_TIMEOUT_S):
            raise RuntimeError(f"the worker on {m} took no more requests")
    rec["serving"] = time.time()
    if fault.kind == "crash-draining":
        log = procs.logs / f"{m}.log"
        procs.signal_machine(m, signal.SIGTERM)  # it drains: DRAIN to every gateway, then finishes
        rec["drain"] = time.time()
        found: list[int] = []

        def draining() -> bool:
            hit = DRAINING.search(log.read_bytes())
            if hit:
                found.append(int(hit.group(1)))
            return bool(hit)

        if not site.wait(draining, STEP_TIMEOUT_S):
            raise RuntimeError(f"the worker on {m} never said it drains")
        rec["held_at_drain"] = found[0]
    world.set_link(m, False)
    rec["start"] = time.time()
    rec["killed_pids"] = procs.kill_machine(m)
    return rec
