"""Security under load, measured: what password-guessing clients cost central and the devices that log
in while they run (``shoal bench login-guessing``; docs/security.md has the figures).

Cases (each on a central of its own):

* ``one-address``: one client guessing one device's password from 127.0.0.2 as fast as central answers.
* ``rotating``: 32 connections rotating over 250 source addresses (127.0.1.x, 127.0.2.x), a fresh
  account name at every guess.
* ``shared-address``: one client guessing 16 existing devices' passwords in turn from 127.0.0.1, the
  address the legitimate devices log in from (devices behind one NAT).
* ``known-client``: the one-address guesser on two devices that logged in before; each logs in again
  with its password (and the device cookie central gave it) once its check has left central's cache.

In every case new devices log in for the first time from 127.0.0.1, each paired with one measured while
the guesser is paused (SIGSTOP, and half a second for central to answer the guesses it had taken in),
so both halves of a pair see the same background load of the machine and their ratio is the guesser's
own cost.
"""

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

# The guesser: ``connections`` connections, each from the next source address in turn, each sending up
# to ``per_connection`` guesses (a new password every time) before reconnecting; names from the list in
# turn, or a fresh one per guess. Counts answers by status.
GUESSER = r"""
import asyncio, base64, itertools, json, sys, time
port, seconds, spec = int(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
counts = {}
next_source = itertools.cycle(spec["sources"]).__next__
next_name = itertools.cycle(spec["names"]).__next__ if spec["names"] else None
serial = itertools.count()
BODY = b'{"model": "echo"}'


def count(what):
    counts[what] = counts.get(what, 0) + 1


def request():
    n = next(serial)
    name = next_name() if next_name else f"guess-{n}"
    auth = base64.b64encode(f"{name}:guess-{n:06d}".encode()).decode()
    head = f"POST /v1/route HTTP/1.1\r\nHost: central\r\nAuthorization: Basic {auth}\r\n"
    return (head + f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n").encode() + BODY


async def guesser(end):
    while time.monotonic() < end:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(next_source(), 0))
        except OSError:
            count("connect-failed")
            await asyncio.sleep(0.05)
            continue
        try:
            for _ in range(spec["per_connection"]):
                if time.monotonic() >= end:
                    break
                writer.write(request())
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    key, _, value = line.partition(b":")
                    if key.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                count(int(head.split(b" ", 2)[1]))
                if b"connection: close" in head.lower():
                    break
        except (OSError, asyncio.IncompleteReadError):
            count("broken")
        finally:
            writer.close()


async def main():
    end = time.monotonic() + seconds
    await asyncio.gather(*(guesser(end) for _ in range(spec["connections"])))


asyncio.run(main())
print(json.dumps(counts))
"""

DEVICE_PASSWORD = "device-password"
COOKIE_HEADER = "Shoal-Device-Cookie"
ROTATING = [f"127.0.{1 + i // 200}.{2 + i % 200}" for i in range(250)]
CASES: dict[str, dict[str, Any]] = {
    "one-address": {"sources": ["127.0.0.2"], "names": ["cam-victim"], "connections": 1},
    "rotating": {"sources": ROTATING, "names": [], "connections": 32, "per_connection": 10},
    "shared-address": {"sources": ["127.0.0.1"], "names": [f"cam-shared-{i}" for i in range(16)], "connections": 1},
    "known-client": {"sources": ["127.0.0.2"], "names": [], "connections": 1},
}
DRAIN_S = 0.5
AUTH_CACHE_S = 10.0  # central's default --auth-cache: a known client's second login waits this out


def _counters(central: LocalCentral) -> dict[str, Any]:
    """Central's login counters; -1 where the operator was refused (429: its address was locked out)."""
    code, body = central.call("GET", "/v1/status")
    if code != 200:
        return {"auth_failures": -1, "auth_throttled": -1, "refused": code}
    return {"auth_failures": body["auth_failures"], "auth_throttled": body["auth_throttled"], "refused": None}


def first_route(port: int, device: str, cookie: str | None = None) -> tuple[int, float, str | None]:
    """A device's route from 127.0.0.1: (status, seconds, the device cookie central handed back). 404 is
    success here: the device was let in, and no cluster serves the model."""
    headers = {"Authorization": "Basic " + base64.b64encode(f"{device}:{DEVICE_PASSWORD}".encode()).decode()}
    if cookie:
        headers[COOKIE_HEADER] = cookie
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        t = time.perf_counter()
        conn.request("POST", "/v1/route", b'{"model": "echo"}', headers)
        r = conn.getresponse()
        r.read()
        dt = time.perf_counter() - t
    finally:
        conn.close()
    return r.status, dt, r.getheader(COOKIE_HEADER)


def first_route_s(port: int, device: str) -> float:
    """Seconds for a device's first route (its password checked by the slow hash)."""
    status, dt, _ = first_route(port, device)
    if status != 404:
        raise RuntimeError(f"device {device}: route answered {status}")
    return dt


def measure_login_guessing(
    workdir: Path,
    case: str = "one-address",
    seconds: float = 12.0,
    devices: int = 8,
    known: int = 0,
    auth_cache_s: float = AUTH_CACHE_S,
) -> dict[str, Any]:
    """One case of ``CASES`` for ``seconds``: first routes of ``devices`` new devices under attack and
    with the guesser paused, in alternation. ``known`` devices log in before the guesser starts, are
    among the names it guesses, and log in again with their cookie once their check left central's
    cache (``--auth-cache``, ``auth_cache_s``)."""
    spec = {"per_connection": 10**9, **CASES[case]}
    known_names = [f"cam-known-{i}" for i in range(known)]
    spec["names"] = list(spec["names"]) + known_names
    args = ["--startup-grace", "0", "--auth-cache", str(auth_cache_s)]
    with LocalCentral(workdir, extra_args=args).start() as central:
        port = central.http_port
        for name in spec["names"]:
            central.add_account("device", name, DEVICE_PASSWORD if name in known_names else "the-real-password")
        for i in range(2 * devices):
            central.add_account("device", f"cam-{i}", DEVICE_PASSWORD)
        cookies = {name: first_route(port, name)[2] for name in known_names}  # logged in before
        known_since = time.monotonic()
        before = _counters(central)
        guesser = subprocess.Popen(
            [sys.executable, "-c", GUESSER, str(port), str(seconds), json.dumps(spec)], stdout=subprocess.PIPE, text=True
        )
        started = time.monotonic()
        quiet: list[float] = []
        busy: list[float] = []
        refused: list[int] = []
        known_answers: list[tuple[int, float]] = []
        try:
            time.sleep(min(2.0, seconds / 4))  # at full speed before measuring
            for i in range(devices):
                os.kill(guesser.pid, signal.SIGSTOP)
                try:
                    time.sleep(DRAIN_S)  # the guesses central had taken in are answered: really quiet
                    status, dt, _ = first_route(port, f"cam-{2 * i}")
                finally:
                    os.kill(guesser.pid, signal.SIGCONT)
                if status == 404:
                    quiet.append(dt)
                else:
                    refused.append(status)
                time.sleep(0.2)
                status, dt, _ = first_route(port, f"cam-{2 * i + 1}")
                if status == 404:
                    busy.append(dt)
                else:
                    refused.append(status)
            if known_names:
                # Their checks have left central's cache: these logins meet the throttle afresh.
                time.sleep(max(0.0, known_since + auth_cache_s + 0.5 - time.monotonic()))
                for name in known_names:
                    status, dt, _ = first_route(port, name, cookies[name])
                    known_answers.append((status, dt))
            attack_s = time.monotonic() - started
        finally:
            out, _ = guesser.communicate(timeout=seconds + 60)
        counts = json.loads(out)
        after = _counters(central)  # the operator logs in from 127.0.0.1 too
    if known_names and attack_s > seconds:
        raise RuntimeError(f"the known clients logged in after the guesser stopped: give it over {attack_s:.0f} s")
    guesses = sum(v for k, v in counts.items() if k.isdigit())
    hashed = after["auth_failures"] - before["auth_failures"]
    throttled = after["auth_throttled"] - before["auth_throttled"]
    q50 = statistics.median(quiet) if quiet else float("nan")
    b50 = statistics.median(busy) if busy else float("nan")
    result: dict[str, Any] = {
        "case": case,
        "guesses": guesses,
        "guesses_per_s": round(guesses / seconds, 1),
        "guesses_refused_429": counts.get("429", 0),
        "guesses_answered_401": counts.get("401", 0),
        "guesses_hash_checked": hashed,
        "hash_checks_per_s": round(hashed / seconds, 2),
        "throttled_counted": throttled,
        "operator_refused": after["refused"],
        "first_logins_refused": len(refused),
        "first_route_p50_quiet_ms": round(q50 * 1000, 1),
        "first_route_p50_under_attack_ms": round(b50 * 1000, 1),
        "first_route_ratio": round(b50 / q50, 2),
        "seconds": seconds,
    }
    if known_names:
        result["known_clients_let_in"] = f"{sum(s == 404 for s, _ in known_answers)}/{len(known_answers)}"
        result["known_client_statuses"] = [s for s, _ in known_answers]
        result["known_client_route_ms"] = [round(dt * 1000, 1) for _, dt in known_answers]
    return result


def login_guessing(workdir: Path, args: Namespace) -> dict[str, Any]:
    seconds = max(12.0, args.seconds * 2)
    out: dict[str, Any] = {}
    for case in CASES:
        r = measure_login_guessing(workdir / case, case, seconds, known=2 if case == "known-client" else 0)
        out.update({f"{case}: {k}": v for k, v in r.items() if k not in ("case", "seconds")})
    out["seconds per case"] = seconds
    return out
