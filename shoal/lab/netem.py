"""A link made slow and lossy at the packet level, in user space (this kernel has no ``netem``):

    python -m shoal.lab.netem --taps lnA,lnB --delay-ms 20 --jitter-ms 5 --loss 0.02 --ready FILE

It opens two TAP devices (``--taps``; they exist while it runs) and copies every Ethernet frame
that arrives on one to the other, each direction on its own: a frame is lost with probability
``--loss`` (really lost: TCP retransmits it, as over a lossy radio or a bad cable), delayed by
``--delay-ms`` plus a normal jitter sample (never negative, never before the frame ahead of it:
frames keep their order), and, with ``--rate-mbit``, queued behind the frames before it at that rate
(a queue longer than ``--queue-ms`` drops what comes, as a router's buffer does).

The lab puts it in a machine's path (``shoal.lab.world.World.impair``): in the bridge's namespace,
the machine's port moves from the bridge to a bridge of its own with the first TAP, and the second
TAP joins the lab's bridge; every frame to and from the machine then crosses this program. Taking
the port back to the lab's bridge ends it (``World.unimpair``). Outside such a fault nothing of it
is on any path.

SIGTERM or SIGINT: stop. It writes its counters (frames passed and lost per direction) to
``--stats`` when given.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import random
import signal
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
FRAME_MAX = 65536


def open_tap(name: str) -> int:
    """A TAP device named ``name`` in this process's network namespace; its file descriptor
    (non-blocking). It disappears when the descriptor is closed."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass
class Profile:
    delay_ms: float = 0.0  # one way
    jitter_ms: float = 0.0  # standard deviation of the one-way delay
    loss: float = 0.0  # probability that a frame is dropped
    rate_mbit: float = 0.0  # 0: no limit
    queue_ms: float = 200.0  # with a rate: the longest a frame may wait for the link

    def __post_init__(self) -> None:
        if min(self.delay_ms, self.jitter_ms, self.rate_mbit) < 0 or not 0 <= self.loss < 1:
            raise ValueError("delay, jitter and rate are >= 0, loss a probability below 1")


@dataclass
class Direction:
    """One way through the link: frames read from ``src`` are written to ``dst`` when due."""

    name: str
    src: int
    dst: int
    queue: deque[tuple[float, bytes]] = field(default_factory=deque)
    last: float = 0.0  # when the frame ahead is delivered (frames keep their order)
    free_at: float = 0.0  # with a rate: when the link has sent what is queued
    passed: int = 0
    lost: int = 0
    dropped: int = 0  # by the rate's queue
    timer: asyncio.TimerHandle | None = None


def due(p: Profile, rng: random.Random, d: Direction, now: float, size: int) -> float | None:
    """When a frame of ``size`` bytes that arrived ``now`` leaves, one way; None when it is lost."""
    if p.loss and rng.random() < p.loss:
        d.lost += 1
        return None
    at = now
    if p.rate_mbit:
        start = max(now, d.free_at)
        if start - now > p.queue_ms / 1000.0:
            d.dropped += 1
            return None
        d.free_at = start + size * 8 / (p.rate_mbit * 1e6)
        at = d.free_at
    delay = rng.gauss(p.delay_ms, p.jitter_ms) if p.jitter_ms else p.delay_ms
    at += max(0.0, delay) / 1000.0
    d.last = max(at, d.last)
    return d.last


class Link:
    def __init__(self, a: int, b: int, profile: Profile, rng: random.Random) -> None:
        self.profile = profile
        self.rng = rng
        self.loop = asyncio.get_running_loop()
        self.ways = [Direction("a->b", a, b), Direction("b->a", b, a)]
        for d in self.ways:
            self.loop.add_reader(d.src, self._read, d)

    def _read(self, d: Direction) -> None:
        now = self.loop.time()
        for _ in range(64):  # what is there now, a bounded batch per wake-up
            try:
                frame = os.read(d.src, FRAME_MAX)
            except BlockingIOError:
                break
            except OSError:
                return
            at = due(self.profile, self.rng, d, now, len(frame))
            if at is None:
                continue
            if at <= now and not d.queue:
                self._write(d, frame)
                continue
            d.queue.append((at, frame))
            if d.timer is None:
                d.timer = self.loop.call_at(at, self._deliver, d)

    def _deliver(self, d: Direction) -> None:
        d.timer = None
        now = self.loop.time()
        while d.queue and d.queue[0][0] <= now:
            self._write(d, d.queue.popleft()[1])
        if d.queue:
            d.timer = self.loop.call_at(d.queue[0][0], self._deliver, d)

    def _write(self, d: Direction, frame: bytes) -> None:
        try:
            os.write(d.dst, frame)
            d.passed += 1
        except OSError:  # the device's queue is full, or it is going away: lost
            d.dropped += 1

    def counters(self) -> dict[str, dict[str, int]]:
        return {d.name: {"passed": d.passed, "lost": d.lost, "dropped": d.dropped} for d in self.ways}


async def main_async(args: argparse.Namespace) -> None:
    names = args.taps.split(",")
    if len(names) != 2:
        raise SystemExit("--taps names two TAP devices, comma separated")
    fds = [open_tap(n) for n in names]
    profile = Profile(args.delay_ms, args.jitter_ms, args.loss, args.rate_mbit, args.queue_ms)
    link = Link(fds[0], fds[1], profile, random.Random(args.seed))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.ready:
        Path(args.ready).write_text("ready\n")
    await stop.wait()
    if args.stats:
        Path(args.stats).write_text(json.dumps(link.counters()))
    for fd in fds:
        os.close(fd)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shoal.lab.netem", description=__doc__.split("\n\n")[0])
    p.add_argument("--taps", required=True, metavar="A,B", help="the two TAP devices to open")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay (default 0)")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="its standard deviation (default 0)")
    p.add_argument("--loss", type=float, default=0.0, help="frames dropped, a probability (default 0)")
    p.add_argument("--rate-mbit", type=float, default=0.0, help="bandwidth each way (default: no limit)")
    p.add_argument("--queue-ms", type=float, default=200.0, help="with a rate: longest wait (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready", default=None, help="a file written once the TAP devices exist")
    p.add_argument("--stats", default=None, help="a file for the counters, written on exit")
    asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    main()
