"""A TCP relay that makes a link slow and unreliable: delay, jitter and loss, in user space.

``shoal bench edge`` shapes bandwidth with the kernel (``tc`` ``tbf`` on a veth pair), but this
kernel has no ``netem``, so the rest of a radio link's behaviour is added here, between the device's
network namespace and the cluster. No maintained impairment proxy installs from the package
registries this project uses: Toxiproxy's server ships as Go binaries and container images (PyPI's
``toxiproxy-python`` is only its client), ``pynetem`` and ``netemu`` drive ``tc netem``, and npm's
``toxy`` is HTTP-only and unmaintained. So this is a small asyncio relay.

What a byte stream sees:

* **delay and jitter**: every segment (``SEGMENT`` bytes, one Ethernet MSS) is delivered one-way
  ``delay`` plus a normal jitter sample (never negative) after it arrived, in both directions;
* **order**: TCP delivers in order, so a segment is never delivered before the one ahead of it;
* **loss**: a lost segment is retransmitted by TCP; here it arrives ``RTO_MIN_S`` (Linux's minimum
  retransmission timeout) plus one round trip late, and holds back those behind it, as head-of-line
  blocking does.

The relay terminates TCP on both sides (it is the device's peer), so the figures model what a
request sees at the application, not a packet trace. Counters of bytes per direction are written to
``--stats`` on exit.

    python -m shoal.bench.relay --route 10.0.0.1:9000=127.0.0.1:8000 --delay-ms 30 --jitter-ms 10 \\
        --loss 0.005 --stats relay.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

SEGMENT = 1448
RTO_MIN_S = 0.2
READ_SIZE = 65536


@dataclass(frozen=True)
class Impairment:
    delay_ms: float = 0.0  # one way
    jitter_ms: float = 0.0  # standard deviation of the one-way delay
    loss: float = 0.0  # probability that a segment is lost once

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or not 0 <= self.loss < 1:
            raise ValueError("delay and jitter are >= 0 ms, loss a probability below 1")


def schedule(
    arrivals: list[float], imp: Impairment, rng: random.Random, last: float = 0.0
) -> tuple[list[float], int]:
    """Delivery times (s) of segments that arrived at ``arrivals`` (s), none before ``last`` (the
    delivery time of the segment ahead), and how many were lost once. Pure but for ``rng``."""
    out = []
    lost = 0
    rtt = 2 * imp.delay_ms / 1000.0
    for t in arrivals:
        at = t + max(0.0, rng.gauss(imp.delay_ms, imp.jitter_ms) if imp.jitter_ms else imp.delay_ms) / 1000.0
        if imp.loss and rng.random() < imp.loss:
            at += RTO_MIN_S + rtt
            lost += 1
        last = max(at, last)
        out.append(last)
    return out, lost


@dataclass
class Counters:
    up: int = 0  # bytes from the listening side (the device) to the target
    down: int = 0
    connections: int = 0
    lost_segments: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    imp: Impairment,
    rng: random.Random,
    counters: Counters,
    direction: str,
) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def deliver() -> None:
        while (item := await queue.get()) is not None:
            at, data = item
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    task = asyncio.create_task(deliver())
    last = 0.0
    try:
        while data := await reader.read(READ_SIZE):
            setattr(counters, direction, getattr(counters, direction) + len(data))
            now = loop.time()
            chunks = [data[i : i + SEGMENT] for i in range(0, len(data), SEGMENT)]
            times, lost = schedule([now] * len(chunks), imp, rng, last)
            counters.lost_segments[direction] += lost
            last = times[-1]
            for at, c in zip(times, chunks, strict=True):
                queue.put_nowait((at, c))
    except (ConnectionError, OSError):
        pass
    finally:
        queue.put_nowait(None)
        try:
            await task
        except (ConnectionError, OSError):
            pass


async def _relay(listen: tuple[str, int], target: tuple[str, int], imp: Impairment, seed: int, counters: Counters):
    rng = random.Random(seed)

    async def handle(d_reader: asyncio.StreamReader, d_writer: asyncio.StreamWriter) -> None:
        counters.connections += 1
        try:
            t_reader, t_writer = await asyncio.open_connection(*target)
        except OSError:
            d_writer.close()
            return
        try:
            await asyncio.gather(
                _pump(d_reader, t_writer, imp, rng, counters, "up"),
                _pump(t_reader, d_writer, imp, rng, counters, "down"),
            )
        finally:
            for w in (t_writer, d_writer):
                w.close()

    return await asyncio.start_server(handle, *listen, reuse_address=True)


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


async def main_async(args: argparse.Namespace) -> None:
    imp = Impairment(args.delay_ms, args.jitter_ms, args.loss)
    counters = Counters()
    servers = []
    for i, r in enumerate(args.route):
        listen, _, target = r.partition("=")
        servers.append(await _relay(_addr(listen), _addr(target), imp, args.seed + i, counters))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.ready:
        Path(args.ready).write_text(json.dumps([s.sockets[0].getsockname()[1] for s in servers]))
    await stop.wait()
    for s in servers:
        s.close()
    if args.stats:
        doc = {"bytes_up": counters.up, "bytes_down": counters.down, "connections": counters.connections,
               "lost_segments": counters.lost_segments}
        Path(args.stats).write_text(json.dumps(doc) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shoal.bench.relay", description=__doc__.split("\n\n")[0])
    p.add_argument("--route", action="append", required=True, metavar="LISTEN=TARGET",
                   help="HOST:PORT to listen on = HOST:PORT to relay to (repeatable)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay in each direction")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="standard deviation of the one-way delay")
    p.add_argument("--loss", type=float, default=0.0, help="probability that a segment is lost once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready", default=None, help="write the bound ports here once listening")
    p.add_argument("--stats", default=None, help="write byte counters here on exit")
    asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    main()
