"""``shoal cluster --processes N``: N gateways of one cluster on this machine, as N child processes
of this one (each a ``shoal cluster`` of its own, so each has its own core's worth of Python).

They share the HTTP port (SO_REUSEPORT: the kernel spreads devices' connections over them) and take
consecutive worker ports from ``--workers``; each is told the others' worker addresses (``--peer``),
so a worker that reaches one links to all. This process only supervises: it holds the ports while
the gateways start (port 0 becomes one the kernel chose, the same for all), writes the ports file
once every gateway is up, restarts a gateway that dies (with back-off), and on SIGTERM or SIGINT
stops them all, each draining as a lone gateway would.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.aio import split_hostport
from shoal.httpserver import bind_tcp, write_ports_file

log = logging.getLogger("shoal.gateway")

START_TIMEOUT_S = 60.0
MAX_RESTART_DELAY_S = 30.0
STEADY_AFTER_S = 60.0  # a gateway up this long has its restart back-off reset
WILDCARDS = ("0.0.0.0", "", "::")


@dataclass
class _Gateway:
    index: int
    argv: list[str]
    ports_file: Path
    popen: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    restart_at: float | None = None

    def start(self) -> None:
        self.ports_file.unlink(missing_ok=True)
        self.popen = subprocess.Popen([sys.executable, "-m", "shoal", *self.argv], stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def advertised_host(args: argparse.Namespace, worker_host: str) -> str:
    """The host the gateways' worker ports are reached at, by workers and by each other."""
    if args.advertise_workers:
        return split_hostport(args.advertise_workers, 0)[0]
    return socket.gethostname() if worker_host in WILDCARDS else worker_host


def grpc_address(value: str) -> tuple[str, int | None]:
    """``--grpc``: host and port, or no port for ``none``."""
    if value.strip().lower() in ("none", "off", ""):
        return "127.0.0.1", None
    return split_hostport(value, 8001)


def child_arguments(
    argv: list[str],
    index: int,
    http: str,
    worker_host: str,
    ports: list[int],
    advertised: str,
    gateway_id: str | None,
    ports_file: Path,
    grpc: str = "none",
) -> list[str]:
    """The command line of gateway ``index``: the user's, then what makes it one of N (later flags
    win over earlier ones; ``--peer`` adds to the user's)."""
    peers = [f"--peer={advertised}:{p}" for j, p in enumerate(ports) if j != index]
    extra = [
        "--processes=1",
        "--reuse-port",
        f"--http={http}",
        f"--grpc={grpc}",
        f"--workers={worker_host}:{ports[index]}",
        f"--advertise-workers={advertised}:{ports[index]}",
        f"--ports-file={ports_file}",
        *peers,
    ]
    if gateway_id:
        extra.append(f"--gateway-id={gateway_id}-{index}")
    return [*argv, *extra]


def run_processes(args: argparse.Namespace) -> int:
    n = args.processes
    hh, hp = split_hostport(args.http, 8000)
    wh, wp = split_hostport(args.workers, 8003)
    gh, gp = grpc_address(args.grpc)
    try:
        # Held (bound, not listening) until every gateway listens: port 0 becomes one port for all.
        http_hold = bind_tcp(hh, hp, 0, reuse_port=True, listen=False)
        holds = [http_hold]
        if gp is not None:  # gRPC's port is shared as HTTP's is
            grpc_hold = bind_tcp(gh, gp, 0, reuse_port=True, listen=False)
            holds.append(grpc_hold)
            grpc = f"{gh}:{grpc_hold.getsockname()[1]}"
        else:
            grpc = "none"
        ports = []
        for i in range(n):
            s = bind_tcp(wh, 0 if wp == 0 else wp + i, 0, reuse_port=True, listen=False)
            holds.append(s)
            ports.append(s.getsockname()[1])
    except OSError as e:
        print(f"shoal cluster: cannot bind the gateways' ports: {e}")
        return 2
    http = f"{hh}:{http_hold.getsockname()[1]}"
    advertised = advertised_host(args, wh)
    folder = Path(tempfile.mkdtemp(prefix="shoal-gateways-"))
    gateways = [
        _Gateway(
            i,
            child_arguments(
                args._argv, i, http, wh, ports, advertised, args.gateway_id, folder / f"{i}.json", grpc
            ),
            folder / f"{i}.json",
        )
        for i in range(n)
    ]
    stop = {"signal": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for g in gateways:
        g.start()
    rc = _wait_started(gateways, stop)
    for s in holds:
        s.close()
    if rc == 0:
        log.info("cluster %s: %d gateway processes on HTTP %s, worker ports %s", args.name, n, http, ports)
        write_ports_file(
            args.ports_file,
            {
                "http": int(http.rsplit(":", 1)[1]),
                "workers": ports[0],
                "worker_ports": ports,
                "grpc": 0 if grpc == "none" else int(grpc.rsplit(":", 1)[1]),
                "pids": [g.popen.pid for g in gateways if g.popen is not None],
            },
        )
        _supervise(gateways, stop)
    _stop_all(gateways)
    for g in gateways:
        g.ports_file.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass
    return rc


def _wait_started(gateways: list[_Gateway], stop: dict[str, int]) -> int:
    """0 once every gateway wrote its ports file; 2 if one exited first (its error is on stderr)."""
    end = time.monotonic() + START_TIMEOUT_S
    while not stop["signal"]:
        if all(g.ports_file.exists() for g in gateways):
            return 0
        for g in gateways:
            if not g.alive():
                code = g.popen.returncode if g.popen is not None else None
                print(f"shoal cluster: gateway process {g.index} exited with status {code} while starting")
                return 2
        if time.monotonic() > end:
            print(f"shoal cluster: the gateway processes did not start within {START_TIMEOUT_S:.0f} s")
            return 2
        time.sleep(0.05)
    return 0


def _supervise(gateways: list[_Gateway], stop: dict[str, int]) -> None:
    """Restart a gateway that ends unasked, with capped exponential back-off, until told to stop."""
    while not stop["signal"]:
        now = time.monotonic()
        for g in gateways:
            if g.alive():
                if now - g.started_at > STEADY_AFTER_S:
                    g.restarts = 0
                continue
            if g.restart_at is None:
                delay = min(MAX_RESTART_DELAY_S, 0.5 * 2**g.restarts)
                code = g.popen.returncode if g.popen is not None else None
                log.warning(
                    "gateway process %d exited (status %s); restarting in %.1f s", g.index, code, delay
                )
                g.restart_at = now + delay
            elif now >= g.restart_at:
                g.restarts += 1
                g.restart_at = None
                g.start()
        time.sleep(0.1)


def _stop_all(gateways: list[_Gateway]) -> None:
    """SIGTERM to each (each drains as a lone gateway does), then wait; SIGKILL what outlives that."""
    for g in gateways:
        if g.alive() and g.popen is not None:
            os.kill(g.popen.pid, signal.SIGTERM)
    end = time.monotonic() + 60.0
    for g in gateways:
        if g.popen is None:
            continue
        try:
            g.popen.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(g.popen.pid, signal.SIGKILL)
            g.popen.wait()
