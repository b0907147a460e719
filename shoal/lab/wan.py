"""The WAN between the site and central, a program run on a machine of its own:

    python -m shoal.lab.wan --route 10.77.1.9:7001=10.77.1.1:7000 --delay-ms 100 --loss 0.01

Every connection from the site to central goes through it (the gateways' and the devices' central
URLs name this machine). It relays TCP as ``shoal.bench.relay`` does, with the same model of delay
and loss, but the impairment can be switched while connections stay open: SIGUSR1 puts it on (the
WAN profile), SIGUSR2 takes it off (a LAN). It starts off (``--on``: on); the lab's ``wan`` fault
switches it on for a while. (This kernel has no netem: the delay and loss are added in user space.)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import cast

from shoal.bench.relay import Counters, Impairment, _addr, _relay


class Switch:
    """Duck-typed ``Impairment`` whose values the signals change (``schedule`` reads them per segment)."""

    def __init__(self, profile: Impairment) -> None:
        self.profile = profile
        self.on = False

    @property
    def delay_ms(self) -> float:
        return self.profile.delay_ms if self.on else 0.0

    @property
    def jitter_ms(self) -> float:
        return self.profile.jitter_ms if self.on else 0.0

    @property
    def loss(self) -> float:
        return self.profile.loss if self.on else 0.0


async def main_async(args: argparse.Namespace) -> None:
    switch = Switch(Impairment(args.delay_ms, args.jitter_ms, args.loss))
    switch.on = args.on
    servers = []
    for i, r in enumerate(args.route):
        listen, _, target = r.partition("=")
        imp = cast(Impairment, switch)  # read per segment: the switch takes effect on open connections
        servers.append(await _relay(_addr(listen), _addr(target), imp, args.seed + i, Counters()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(switch, "on", True))
    loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(switch, "on", False))
    if args.ready:
        Path(args.ready).write_text("ready\n")
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shoal.lab.wan", description=__doc__.split("\n\n")[0])
    p.add_argument("--route", action="append", required=True, metavar="LISTEN=TARGET")
    p.add_argument("--delay-ms", type=float, default=100.0, help="one-way delay when on (default 100)")
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.01, help="segments lost once when on (default 0.01)")
    p.add_argument("--on", action="store_true", help="the WAN profile from the start (default: a LAN)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready", default=None, help="a file written once listening")
    asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    main()
