"""Security under load, measured: what a password-guessing client costs central and the devices that
log in while it runs (``shoal bench login-guessing``; docs/security.md has the figures)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

from shoal.local import LocalCentral

# The guesser: one keep-alive connection from its own loopback address, as fast as central answers.
GUESSER = """
import base64, http.client, json, sys, time
port, seconds, source = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
auth = "Basic " + base64.b64encode(b"cam-victim:guess-0000").decode()
counts, conn = {}, None
end = time.monotonic() + seconds
while time.monotonic() < end:
    if conn is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    conn.request("POST", "/v1/route", b'{"model": "echo"}', {"Authorization": auth})
    r = conn.getresponse()
    r.read()
    counts[r.status] = counts.get(r.status, 0) + 1
    if r.will_close:
        conn.close()
        conn = None
print(json.dumps(counts))
"""

DEVICE_PASSWORD = "device-password"


def first_route_s(port: int, device: str) -> float:
    """Seconds for a device's first route (its password checked by the slow hash)."""
    auth = "Basic " + base64.b64encode(f"{device}:{DEVICE_PASSWORD}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        t = time.perf_counter()
        conn.request("POST", "/v1/route", b'{"model": "echo"}', {"Authorization": auth})
        r = conn.getresponse()
        r.read()
        dt = time.perf_counter() - t
    finally:
        conn.close()
    if r.status != 404:  # authenticated; no cluster serves the model here
        raise RuntimeError(f"device {device}: route answered {r.status}")
    return dt


def measure_login_guessing(workdir: Path, seconds: float = 12.0, devices: int = 8) -> dict[str, Any]:
    """First routes of new devices with a guesser hammering one account from 127.0.0.2, and with the
    guesser paused (SIGSTOP), in alternation: both halves of each pair see the same background load
    of the machine, so their ratio is the guesser's own cost."""
    with LocalCentral(workdir, extra_args=["--startup-grace", "0"]).start() as central:
        central.add_account("device", "cam-victim", "the-real-password")
        for i in range(2 * devices):
            central.add_account("device", f"cam-{i}", DEVICE_PASSWORD)
        guesser = subprocess.Popen(
            [sys.executable, "-c", GUESSER, str(central.http_port), str(seconds), "127.0.0.2"],
            stdout=subprocess.PIPE,
            text=True,
        )
        quiet: list[float] = []
        busy: list[float] = []
        try:
            time.sleep(min(2.0, seconds / 4))  # at full speed before measuring
            for i in range(devices):
                os.kill(guesser.pid, signal.SIGSTOP)
                try:
                    quiet.append(first_route_s(central.http_port, f"cam-{2 * i}"))
                finally:
                    os.kill(guesser.pid, signal.SIGCONT)
                time.sleep(0.2)
                busy.append(first_route_s(central.http_port, f"cam-{2 * i + 1}"))
        finally:
            out, _ = guesser.communicate(timeout=seconds + 60)
        counts = {int(k): v for k, v in json.loads(out).items()}
        status = central.call("GET", "/v1/status")[1]
    q50, b50 = statistics.median(quiet), statistics.median(busy)
    return {
        "guesses": sum(counts.values()),
        "guesses_per_s": round(sum(counts.values()) / seconds, 1),
        "guesses_refused_429": counts.get(429, 0),
        "guesses_hash_checked": status["auth_failures"],
        "throttled_counted": status["auth_throttled"],
        "first_route_p50_quiet_ms": round(q50 * 1000, 1),
        "first_route_p50_under_attack_ms": round(b50 * 1000, 1),
        "first_route_ratio": round(b50 / q50, 2),
        "seconds": seconds,
    }


def login_guessing(workdir: Path, args: Namespace) -> dict[str, Any]:
    return measure_login_guessing(workdir, seconds=max(12.0, args.seconds * 2))
