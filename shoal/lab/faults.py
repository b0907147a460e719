"""Faults and their schedule. A schedule is a list of ``Fault``s drawn from a seed (the same seed,
the same faults, pauses and lengths); ``inject`` carries one out on the lab's machines and records
when, by the wall clock the devices' logs use.

* ``partition(machine, seconds)``: the machine's own end of its link down, then up again after
  ``seconds``. Silent: nothing it sends leaves, nothing sent to it arrives, no FIN, no RST; its
  processes keep running.
* ``crash(machine)``: its link down, then every process the lab started on it SIGKILLed (in that
  order, so not even the kernel's resets of their connections get out); it stays down.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from shoal.lab.procs import Processes
from shoal.lab.world import World

KINDS = ("partition", "crash")


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
            f"partition({self.machine}, {self.seconds:.1f} s)"
            if self.kind == "partition"
            else f"crash({self.machine})"
        )


def ci_schedule(seed: int) -> list[Fault]:
    """The CI-sized scenario: worker machine w1 partitioned for 6.5 to 7.5 s and healed, then gateway
    machine gw-a crashed. The partition outlasts the gateways' dead-after (5 s, checked once a
    heartbeat, so up to 6 s): a shorter one heals before anyone notices."""
    rng = random.Random(seed)
    return [
        Fault(
            "partition",
            "w1",
            pause_s=round(rng.uniform(2.0, 4.0), 2),
            seconds=round(rng.uniform(6.5, 7.5), 2),
        ),
        Fault("crash", "gw-a", pause_s=round(rng.uniform(2.0, 4.0), 2)),
    ]


def inject(fault: Fault, world: World, procs: Processes) -> dict[str, Any]:
    """Carry the fault out (a partition blocks until it heals); its record."""
    rec: dict[str, Any] = {**asdict(fault), "label": fault.label}
    if fault.kind == "partition":
        world.set_link(fault.machine, False)
        rec["start"] = time.time()
        time.sleep(fault.seconds)  # the fault's length, drawn from the seed
        world.set_link(fault.machine, True)
        rec["heal"] = time.time()
    else:
        world.set_link(fault.machine, False)
        rec["start"] = time.time()
        rec["killed_pids"] = procs.kill_machine(fault.machine)
    return rec
