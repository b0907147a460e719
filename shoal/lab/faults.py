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
"""

from __future__ import annotations

import random
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any

from shoal.lab.procs import Processes
from shoal.lab.world import World

KINDS = ("partition", "crash", "restart", "wan")
LASTING = ("partition", "restart", "wan")  # kinds that end (heal) after their seconds


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
    """The CI-sized scenario: worker machine w1 partitioned for 6.5 to 7.5 s and healed; gateway
    machine gw-a partitioned as long and healed; central replica central-1's machine crashed;
    PostgreSQL killed and started again 4 to 6 s later; gateway machine gw-b crashed (after gw-a's
    partition the devices' routes name gw-b first: the crash hits the gateway carrying the load, and
    the devices must carry on through the one that healed). A partition
    outlasts the dead-after (5 s, checked once a heartbeat, so up to 6 s): a shorter one heals before
    anyone notices."""
    rng = random.Random(seed)

    def pause() -> float:
        return round(rng.uniform(2.0, 4.0), 2)

    return [
        Fault("partition", "w1", pause_s=pause(), seconds=round(rng.uniform(6.5, 7.5), 2)),
        Fault("partition", "gw-a", pause_s=pause(), seconds=round(rng.uniform(6.5, 7.5), 2)),
        Fault("crash", "central-1", pause_s=pause()),
        Fault("restart", "db", pause_s=pause(), seconds=round(rng.uniform(4.0, 6.0), 2)),
        Fault("crash", "gw-b", pause_s=pause()),
    ]


def full_schedule(seed: int) -> list[Fault]:
    """The fuller scenario: the CI one with the WAN between the site and central on for 10 s (after
    the gateway's partition) and the database machine partitioned silently for 6 to 8 s (after
    PostgreSQL's restart)."""
    ci = ci_schedule(seed)
    rng = random.Random(seed + 10_000)
    wan = Fault("wan", "wan", pause_s=round(rng.uniform(2.0, 4.0), 2), seconds=10.0)
    db_cut = Fault(
        "partition", "db", pause_s=round(rng.uniform(2.0, 4.0), 2), seconds=round(rng.uniform(6.0, 8.0), 2)
    )
    return [*ci[:2], wan, *ci[2:4], db_cut, ci[4]]


SCENARIOS = {"ci": ci_schedule, "full": full_schedule}


def inject(fault: Fault, world: World, procs: Processes) -> dict[str, Any]:
    """Carry the fault out (a partition blocks until it heals); its record."""
    rec: dict[str, Any] = {**asdict(fault), "label": fault.label}
    if fault.kind == "partition":
        world.set_link(fault.machine, False)
        rec["start"] = time.time()
        time.sleep(fault.seconds)  # the fault's length, drawn from the seed
        world.set_link(fault.machine, True)
        rec["heal"] = time.time()
    elif fault.kind == "restart":
        rec["start"] = time.time()
        rec["killed_pids"] = procs.kill_machine(fault.machine)
        time.sleep(fault.seconds)
        rec["started_pids"] = [c.pid for c in procs.respawn(fault.machine)]
        rec["heal"] = time.time()
    elif fault.kind == "wan":
        procs.signal_machine(fault.machine, signal.SIGUSR1)
        rec["start"] = time.time()
        time.sleep(fault.seconds)
        procs.signal_machine(fault.machine, signal.SIGUSR2)
        rec["heal"] = time.time()
    else:
        world.set_link(fault.machine, False)
        rec["start"] = time.time()
        rec["killed_pids"] = procs.kill_machine(fault.machine)
    return rec
