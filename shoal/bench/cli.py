"""``shoal bench``: the serving path measured side by side on this machine.

Suites (each starts its own gateway and workers as real processes and stops them after):

* ``latency``    p50/p99 at one connection through the gateway, against calling the same model in-process.
* ``throughput`` requests/s of a trivial model at 64 keep-alive clients, gateway and worker on ONE core.
* ``link``       requests/s over the worker link alone (the real gateway pool driven in-process).
* ``batching``   throughput of the MNIST CNN at saturation against its own batched speed in-process.
* ``transfer``   3 MB payloads through a gateway, MB/s.
* ``startup``    seconds from starting a worker to its first answer.
* ``connections`` connections one gateway holds at once, each answered.
* ``pipeline``   the read-digits pipeline: accuracy on generated multi-digit images, latency.
* ``reroute``    how fast a device is re-routed when its cluster dies.
* ``client``     the device client's CPU time per request and its p50, direct and routed through central.
* ``central``    routes answered per second by one central (SQLite; PostgreSQL too with ``--central-pg URL``);
  with ``--baseline DIR``, against another source tree's central in alternating runs.
* ``http-stacks`` the same tiny endpoint on raw ASGI, Starlette and aiohttp: why the gateway is raw ASGI.
* ``soak``       memory of a gateway and a worker over a long run with workers killed and replaced.
* ``storage``    the throughput run with result storage off and on: requests/s, gateway CPU per request.
* ``request-memory`` the gateway's peak memory for one large hostile request (60 MB of one-character
  JSON strings, of JSON numbers, of two-byte binary BYTES, four at once) and the largest accepted one,
  and how much that delays another client.
* ``login-guessing`` password guessers at full speed (one address; 250 rotating addresses with fresh
  names; the devices' own shared address; a device that logged in before being guessed): hash checks
  they get, other devices' first-route latency meanwhile, and whether the known device gets in.
* ``autoscale``  workers started and drained by load: load step to a new worker serving, requests lost
  over 20+ scale events, worker-seconds on a day-shaped trace against a static fleet, wake from zero.
* ``gateways``   a cluster served by several gateways: requests/s and gateway CPU per request through 1, 2
  (and 4) gateway processes; one of two gateways SIGKILLed under devices' load (failed requests, p99
  after the kill, detection); 50 000 idle connections held over four gateway processes.
* ``grpc``       the gateway's gRPC front against its HTTP binary extension, side by side: requests/s at
  64 in flight and p50 one at a time, CPU per call, bare grpcio servers for where it goes (needs
  ``shoal[grpc]``); with ``--baseline DIR`` also another source tree's gRPC front, alternating.
* ``profile``    where each microsecond of a request goes, gateway and worker apart (py-spy; on request)
* ``overload``   one worker past its capacity, open-loop, requests with deadlines: good answers, the
  admitted p99, how fast the rest are refused; priorities; model time on answers nobody read.
* ``request-cpu`` gateway and worker CPU time per request (echo, small JSON, 16 connections); with
  ``--baseline DIR`` alternating with another source tree's, to measure a change to the request path.
* ``serving-cost`` issue 26's figures: requests/s and gateway and worker CPU per request at 64 connections
  on one core (echo JSON, echo binary, MNIST CNN against its own CPU per image) and one connection's
  p50; with ``--baseline DIR`` alternating with another source tree's.
* ``edge``       the device client's placement policies (local, remote, fastest, cascade, split) on
  emulated Wi-Fi, LTE and outage links, in network namespaces it creates (root; run only when named).
"""

from __future__ import annotations

import argparse
import sys

HELP = "Measure the serving path: latency, throughput, worker link, dynamic batching, transfer."
EXAMPLE = """
shoal bench --quick               # about a minute: the serving path's suites, short runs
shoal bench                       # every suite but edge, about ten minutes (progress lines as it goes)
shoal bench latency throughput --json results.json
git worktree add /tmp/before HEAD~5 && shoal bench central --baseline /tmp/before
sudo shoal bench edge --edge-out runs/edge     # placement policies on emulated links, ~6 min
"""

SUITES = (
    "latency",
    "throughput",
    "link",
    "batching",
    "transfer",
    "startup",
    "connections",
    "pipeline",
    "reroute",
    "central",
    "client",
    "storage",
    "soak",
    "http-stacks",
    "request-memory",
    "login-guessing",
    "autoscale",
    "gateways",
    "grpc",
    "overload",
    "profile",
    "request-cpu",
    "serving-cost",
    "edge",
)
# Suites run only when named: edge needs root (network namespaces) and takes long; profile needs py-spy.
ON_REQUEST = ("edge", "profile")
# shoal bench --quick: the serving path's suites, short runs (about a minute in all).
QUICK = ("latency", "throughput", "link", "batching", "transfer", "startup")
# The module of each suite, by subject.
MODULES = {
    **dict.fromkeys(
        ("latency", "throughput", "link", "batching", "transfer", "startup", "connections", "pipeline"),
        "shoal.bench.serving",
    ),
    "reroute": "shoal.bench.system",
    "central": "shoal.bench.central",
    "client": "shoal.bench.client",
    "storage": "shoal.bench.storage",
    "soak": "shoal.bench.soak",
    "http-stacks": "shoal.bench.http_stacks",
    "request-memory": "shoal.bench.big_requests",
    "login-guessing": "shoal.bench.security",
    "autoscale": "shoal.bench.autoscale",
    "gateways": "shoal.bench.gateways",
    "grpc": "shoal.bench.grpc_bench",
    "overload": "shoal.bench.overload",
    "profile": "shoal.bench.profile",
    "request-cpu": "shoal.bench.request_cpu",
    "serving-cost": "shoal.bench.serving_cost",
    "edge": "shoal.bench.edge",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Checked in run(): argparse refuses an empty list against choices (a known argparse bug).
    p.add_argument(
        "suites", nargs="*", metavar="SUITE", help=f"suites to run (default: all): {', '.join(SUITES)}"
    )
    p.add_argument(
        "--seconds", type=float, default=8.0, help="measuring time per load run (default %(default)s)"
    )
    p.add_argument("--connections", type=int, default=64, help="keep-alive clients for throughput runs")
    p.add_argument("--hold", type=int, default=10_000, help="connections for the connections suite")
    p.add_argument(
        "--gateway-hold", type=int, default=50_000, help="gateways: idle connections held over four gateways"
    )
    p.add_argument(
        "--profile-model", choices=("echo", "mnist-cnn"), default="echo", help="profile: the model under load"
    )
    p.add_argument("--soak-seconds", type=float, default=120.0, help="length of the soak suite")
    p.add_argument("--pipeline-images", type=int, default=300, help="images for the pipeline suite")
    p.add_argument(
        "--baseline",
        default=None,
        metavar="DIR",
        help="central, client, request-cpu and serving-cost suites: also run the central (client; gateway and worker) "
        "of this shoal source tree (e.g. a git worktree of an older commit), alternating with this one",
    )
    p.add_argument("--edge-seconds", type=float, default=60.0, help="edge: seconds per link profile")
    p.add_argument("--edge-out", default=None, help="edge: folder for results.json and the plots")
    p.add_argument(
        "--edge-split-repo",
        default=None,
        help="edge: a repository holding the split pair (else trained here)",
    )
    p.add_argument(
        "--edge-profiles", nargs="+", default=None, help="edge: link profiles to run (default: all)"
    )
    p.add_argument("--edge-policies", nargs="+", default=None, help="edge: policies to run (default: all)")
    p.add_argument(
        "--central-pg",
        default=None,
        metavar="URL",
        help="central: also on this PostgreSQL server (an admin URL, e.g. postgresql://postgres@127.0.0.1:5432/"
        "postgres): a database is created there and dropped after (default: SQLite only)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"about a minute: {', '.join(QUICK)} (unless suites are named), with --seconds 2, "
        "--hold 1000 and shorter soak and pipeline runs",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--workdir", default=None, help="folder for process logs")


def run(args: argparse.Namespace) -> int:
    import importlib
    import json
    import platform
    import tempfile
    import time
    from pathlib import Path

    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        print(
            f"shoal bench: unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}",
            file=sys.stderr,
        )
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="shoal-bench-"))
    chosen = args.suites or [s for s in SUITES if s not in ON_REQUEST]
    if args.quick:
        chosen = args.suites or list(QUICK)
        args.seconds = min(args.seconds, 2.0)
        args.hold = min(args.hold, 1000)
        args.gateway_hold = min(args.gateway_hold, 2000)
        args.soak_seconds = min(args.soak_seconds, 20.0)
        args.pipeline_images = min(args.pipeline_images, 50)
    results: dict[str, object] = {
        "machine": {
            "cpus": _cpus(),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
    }
    # Every chosen suite's module first: one that cannot run says so before any suite starts.
    modules = {name: importlib.import_module(MODULES[name]) for name in chosen}
    began = time.monotonic()
    for i, name in enumerate(chosen, 1):
        print(f"== {name} ({i} of {len(chosen)}, {time.monotonic() - began:.0f} s in)", flush=True)
        t0 = time.monotonic()
        res = getattr(modules[name], name.replace("-", "_"))(workdir / name, args)
        results[name] = res
        for k, v in res.items():
            print(f"  {k:<36} {v}")
        print(f"  ({name}: {time.monotonic() - t0:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
