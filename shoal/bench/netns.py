"""Two network namespaces of our own joined by a veth pair: a "cluster" side and a "device" side,
for measuring the device client on an emulated link (``shoal bench edge``, tests/test_edge.py).

Everything happens inside namespaces this module creates (named ``shoal-<tag>-cl`` and
``shoal-<tag>-dev``, the veth ends inside them), so the machine's own interfaces, routes and loopback
are never touched, and deleting the two namespaces removes all of it. The bench's own process enters
the cluster namespace (``setns``) while it starts central, the gateway and the workers, so they
listen on that namespace's loopback; the device program runs in the other one through
``ip netns exec``.

Bandwidth is shaped by the kernel (``tc`` token bucket, ``tbf``, on each veth end's egress: upload
on the device's end, download on the cluster's); delay, jitter and loss by ``shoal.bench.relay``; an
outage is the cluster's end of the veth taken down (the device's end stays up without carrier, so
packets vanish as they do when a radio link is lost, instead of failing at once).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")
    return r


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (None when they can): not root, no ``ip``/``tc``,
    or the kernel or a sandbox refuses."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "taskset"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            return f"'{tool}' is not installed"
    name = f"shoal-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"'ip netns add' refused: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@dataclass
class LinkProfile:
    name: str
    up_mbit: float  # device -> cluster
    down_mbit: float  # cluster -> device
    delay_ms: float  # one way, each direction (the relay)
    jitter_ms: float
    loss: float  # per segment, each direction (the relay)
    outage: tuple[float, float] | None = None  # (start, end) as fractions of the run: link down


@dataclass
class VethPair:
    tag: str
    subnet: int = 0  # third octet of 10.213.<subnet>.0/30

    def __post_init__(self) -> None:
        self.cluster_ns = f"shoal-{self.tag}-cl"
        self.device_ns = f"shoal-{self.tag}-dev"
        # Interface names are at most 15 characters.
        self.cluster_if = f"sh{self.tag[-8:]}c"
        self.device_if = f"sh{self.tag[-8:]}d"
        self.cluster_ip = f"10.213.{self.subnet}.1"
        self.device_ip = f"10.213.{self.subnet}.2"
        self.created = False

    def create(self) -> VethPair:
        for ns in (self.cluster_ns, self.device_ns):
            _ip("netns", "add", ns)
        self.created = True
        _ip("link", "add", self.cluster_if, "netns", self.cluster_ns, "type", "veth",
            "peer", "name", self.device_if, "netns", self.device_ns)
        for ns, ifname, addr in ((self.cluster_ns, self.cluster_if, self.cluster_ip),
                                 (self.device_ns, self.device_if, self.device_ip)):
            _ip("addr", "add", f"{addr}/30", "dev", ifname, ns=ns)
            _ip("link", "set", ifname, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
        return self

    def shape(self, up_mbit: float, down_mbit: float) -> None:
        """Token-bucket rate limits on both ends' egress (replacing any before)."""
        for ns, ifname, mbit in ((self.device_ns, self.device_if, up_mbit),
                                 (self.cluster_ns, self.cluster_if, down_mbit)):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", ifname, "root"],
                           capture_output=True)
            # A burst of ~10 ms at the rate (at least 16 KB so one jumbo read passes), queue 200 ms.
            burst = max(16_000, int(mbit * 1e6 / 8 * 0.01))
            cmd = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ifname, "root", "tbf",
                   "rate", f"{mbit}mbit", "burst", str(burst), "latency", "200ms"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            if r.returncode != 0:
                raise NetnsError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    def set_link(self, up: bool) -> None:
        _ip("link", "set", self.cluster_if, "up" if up else "down", ns=self.cluster_ns)

    def in_device(self, argv: list[str], cpu: int | None = None) -> list[str]:
        """The command line that runs ``argv`` on the device side (on one core when ``cpu`` is given)."""
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        return ["ip", "netns", "exec", self.device_ns, *pin, *argv]

    @contextlib.contextmanager
    def inside_cluster(self) -> Iterator[None]:
        """This thread (and the processes it starts meanwhile) in the cluster namespace."""
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/self/ns/net") as home, open(f"{NETNS_DIR}/{self.cluster_ns}") as there:
            if libc.setns(there.fileno(), CLONE_NEWNET) != 0:
                raise NetnsError(f"setns into {self.cluster_ns}: {os.strerror(ctypes.get_errno())}")
            try:
                yield
            finally:
                libc.setns(home.fileno(), CLONE_NEWNET)

    def delete(self) -> None:
        """Delete both namespaces (and with them the veth pair and its queues)."""
        if not self.created:
            return
        for ns in (self.cluster_ns, self.device_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self.created = False

    def __enter__(self) -> VethPair:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.delete()
