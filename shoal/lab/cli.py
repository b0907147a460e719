"""``shoal lab``: the system across emulated machines under a seeded fault schedule, checked.

Needs root (network namespaces, a bridge, ``ip``); touches nothing of the host's own network. See
docs/lab.md for what it builds, the scenario and the checker's rules.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

HELP = (
    "Run shoal across emulated machines (network namespaces), inject faults from a seed, check every request."
)
EXAMPLE = """
sudo shoal lab --seed 1 --out runs/lab            # the CI-sized scenario, about 90 s
sudo shoal lab --seed 7 --out runs/lab7 --json    # print the summary as JSON
sudo shoal lab --scenario full --out runs/lab-full # + lossy links, the WAN, the db cut off, a site lost
sudo shoal lab --scenario federation --out runs/fed # Flower sites on machines, one lost a round
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed", type=int, default=1, help="draws the fault schedule and the devices' inputs (default 1)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("runs/lab"), help="folder for the results (default runs/lab)"
    )
    p.add_argument(
        "--run",
        type=int,
        default=None,
        help="run number 1..250 (addresses 10.77.RUN.N; default: the first free)",
    )
    p.add_argument(
        "--scenario",
        choices=("ci", "full", "federation", "ray"),
        default="ci",
        help="ci: the CI-sized fault schedule (about a minute and a half); full: with lossy and narrow "
        "links, the WAN on and the database cut off too; federation: docs/fusion.md's federation "
        "across machines, a site's machine lost for a round; ray: workers as Ray actors on three "
        "machines, a node and the head lost (about five minutes; shoal.lab.ray_lab) (default ci)",
    )
    p.add_argument("--devices", type=int, default=4, help="device accounts, one client each (default 4)")
    p.add_argument("--in-flight", type=int, default=4, help="requests at once per device (default 4)")
    p.add_argument(
        "--client-timeout", type=float, default=10.0, help="the device client's timeout, s (default 10)"
    )
    p.add_argument("--json", action="store_true", help="print the whole summary as JSON")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    from shoal.lab.run import LabConfig, run_lab
    from shoal.lab.world import unavailable

    why = unavailable()
    if why:
        print(f"shoal lab: {why}", file=sys.stderr)
        return 2
    # Each tears down as Ctrl+C does; SIGINT too, set here: a process started in the background of a
    # shell script inherits SIGINT ignored, and Python then leaves it ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    if args.scenario == "federation":
        from shoal.lab.federation import run_federation

        fed = run_federation(args.out, args.run, lambda s: print(s, file=sys.stderr, flush=True))
        print(json.dumps(fed, indent=1) if args.json else f"passed: {fed['passed']}; {args.out / 'summary.json'}")
        return 0 if fed["passed"] else 1
    if args.scenario == "ray":
        from shoal.lab.ray_lab import run_ray_cli

        return run_ray_cli(args)
    names = ("seed", "scenario", "run", "devices", "in_flight", "client_timeout")
    cfg = LabConfig(args.out, **{k: getattr(args, k) for k in names})
    summary = run_lab(cfg, lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        keys = ("requests", "answered", "failed", "lost", "answered_twice", "wrong_answers", "answered_by")
        for k in keys:
            print(f"{k}: {summary[k]}")
        for f in summary["faults"]:
            print(f"{f['fault']}: " + ", ".join(f"{k} {v}" for k, v in f.items() if k != "fault"))
        for name, ph in summary["phases"].items():
            print(f"phase {name}: {ph['requests']} requests, p50 {ph['p50_ms']} ms, p99 {ph['p99_ms']} ms")
        print(f"passed: {summary['passed']}; {args.out / 'summary.json'}, {summary['timeline']}")
    return 0 if summary["passed"] else 1
