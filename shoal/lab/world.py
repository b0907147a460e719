"""The lab's world: a Linux bridge inside a network namespace of its own, and machines plugged into
it, each a namespace ``shoal-lab-<run>-<name>`` with one veth end (``eth0``, address
``10.77.<run>.N/24``) whose other end is a port of the bridge.

Nothing of the host is touched: the bridge, the ports and every address live in namespaces this
module creates, and deleting them removes all of it. The bridge itself has the address
``10.77.<run>.254``: the lab's own threads join the bridge namespace (``enter``) to reach the
machines, as an observer on the wire would.

A run claims its number with a file ``/run/shoal-lab/<run>.pid`` (the lab's process id and start
time). At the next start, a lab whose owner is gone (killed, crashed) is removed: the processes left
in its namespaces are killed by their ids, and its namespaces deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shoal.bench import netns
from shoal.bench.netns import CLONE_NEWNET, NETNS_DIR, NetnsError, _ip

PREFIX = "shoal-lab-"
OWNERS = Path("/run/shoal-lab")
RUNS = range(1, 251)
BRIDGE = "br0"
OBSERVER = 254  # the bridge's own host number


def _tc(*args: str, ns: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", ns, "tc", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")
    return r


@dataclass
class Machine:
    name: str
    ns: str
    address: str
    port: str  # the veth end on the bridge


def unavailable() -> str | None:
    """Why the lab cannot run here (None when it can): namespaces refused, or no ``setpriv``."""
    return netns.unavailable() or (None if shutil.which("setpriv") else "'setpriv' is not installed")


def enter(ns: str) -> None:
    """Move the calling thread into namespace ``ns`` for good: the sockets it opens from then on are
    there (a namespace is a property of each thread; the others stay where they are)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"{NETNS_DIR}/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise NetnsError(f"setns into {ns}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (with its id, names one process for good)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(run: int) -> bool:
    try:
        pid, started = (OWNERS / f"{run}.pid").read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid)) == started


def lab_namespaces() -> dict[int, list[str]]:
    """Every lab namespace on this machine, by run number."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20)
    out: dict[int, list[str]] = {}
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        run = name[len(PREFIX) :].split("-", 1)[0]
        if name.startswith(PREFIX) and run.isdigit():
            out.setdefault(int(run), []).append(name)
    return out


def remove_namespaces(names: list[str]) -> None:
    """Kill what runs in each namespace (by process id) and delete it."""
    for ns in names:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=20)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def clean_stale() -> list[int]:
    """Remove the labs whose owner is gone; the runs removed."""
    removed = []
    for run, names in lab_namespaces().items():
        if not _owner_alive(run):
            remove_namespaces(names)
            removed.append(run)
    if OWNERS.is_dir():
        for f in OWNERS.glob("*.pid"):
            if f.stem.isdigit() and not _owner_alive(int(f.stem)):
                f.unlink(missing_ok=True)
    return removed


def claim_run(want: int | None = None) -> int:
    """A free run number, held by this process until ``release``."""
    OWNERS.mkdir(parents=True, exist_ok=True)
    clean_stale()
    mine = f"{os.getpid()} {_start_time(os.getpid())}"
    for run in [want] if want is not None else RUNS:
        if run not in RUNS:
            raise NetnsError(f"run numbers are {RUNS.start}..{RUNS.stop - 1}")
        try:
            fd = os.open(OWNERS / f"{run}.pid", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        return run
    raise NetnsError(f"lab run {want} is in use by a live lab" if want else "no free lab run number")


class World:
    """The bridge and the machines of one run. ``delete`` removes everything (idempotent)."""

    def __init__(self, run: int) -> None:
        self.run = run
        self.bridge_ns = f"{PREFIX}{run}-br"
        self.machines: dict[str, Machine] = {}
        self.created = False

    @property
    def observer_address(self) -> str:
        return f"10.77.{self.run}.{OBSERVER}"

    def create(self) -> World:
        _ip("netns", "add", self.bridge_ns)
        self.created = True
        ns = self.bridge_ns
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "add", BRIDGE, "type", "bridge", "forward_delay", "0", ns=ns)
        _ip("addr", "add", f"{self.observer_address}/24", "dev", BRIDGE, ns=ns)
        _ip("link", "set", BRIDGE, "up", ns=ns)
        return self

    def add(self, name: str) -> Machine:
        """A machine plugged into the bridge, with the next address."""
        if len(name) > 12 or not name.replace("-", "").isalnum():
            raise ValueError(f"machine names are up to 12 letters, digits and '-': {name!r}")
        m = Machine(
            name, f"{PREFIX}{self.run}-{name}", f"10.77.{self.run}.{len(self.machines) + 1}", f"p-{name}"
        )
        _ip("netns", "add", m.ns)
        self.machines[name] = m
        _ip("link", "add", m.port, "type", "veth", "peer", "name", "eth0", "netns", m.ns, ns=self.bridge_ns)
        _ip("link", "set", m.port, "master", BRIDGE, "up", ns=self.bridge_ns)
        _ip("addr", "add", f"{m.address}/24", "dev", "eth0", ns=m.ns)
        _ip("link", "set", "eth0", "up", ns=m.ns)
        _ip("link", "set", "lo", "up", ns=m.ns)
        return m

    def set_link(self, name: str, up: bool) -> None:
        """The machine's own end of its link up or down: down, its packets vanish both ways (no FIN,
        no RST reaches anyone) and the bridge drops what is sent to it."""
        _ip("link", "set", "eth0", "up" if up else "down", ns=self.machines[name].ns)

    def kill_everything(self, name: str) -> list[int]:
        """SIGKILL whatever still runs in the machine's namespace (what its processes started in
        sessions of their own too: a machine that crashes keeps nothing); the ids."""
        r = subprocess.run(["ip", "netns", "pids", self.machines[name].ns], capture_output=True, text=True, timeout=20)
        killed = []
        for pid in r.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
        return killed

    def set_dropping(self, name: str, dropping: bool) -> None:
        """Every packet to and from the machine dropped, its link staying up (the carrier, the
        addresses and the routes as they were: nothing tells its processes or its peers): a
        ``blackhole`` queue on both ends of its link's egress, the machine's ``eth0`` and its port on
        the bridge. (This kernel has no packet filter, ``nftables`` or ``iptables``, nor tc's
        classifiers and actions; the ``blackhole`` queueing discipline is there.)"""
        m = self.machines[name]
        for ns, dev in ((m.ns, "eth0"), (self.bridge_ns, m.port)):
            if dropping:
                _tc("qdisc", "replace", "dev", dev, "root", "blackhole", ns=ns)
            else:
                _tc("qdisc", "del", "dev", dev, "root", ns=ns, check=False)

    def set_rate(self, name: str, mbit: float | None, queue_ms: float = 200.0) -> None:
        """The machine's link limited to ``mbit`` each way (a ``tbf`` token bucket on both ends'
        egress, a queue of ``queue_ms`` beyond which packets are dropped), or back to the bridge's
        speed (None)."""
        m = self.machines[name]
        for ns, dev in ((m.ns, "eth0"), (self.bridge_ns, m.port)):
            if mbit is None:
                _tc("qdisc", "del", "dev", dev, "root", ns=ns, check=False)
                continue
            burst = max(16_000, int(mbit * 1e6 / 8 * 0.01))  # 10 ms at the rate, at least 16 KB
            _tc(
                "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst),
                "latency", f"{queue_ms:g}ms", ns=ns,
            )  # fmt: skip

    def taps(self, name: str) -> tuple[str, str]:
        """The TAP devices of ``shoal.lab.netem`` on the machine's path while it is impaired."""
        return f"ta-{name}", f"tb-{name}"

    def impair(self, name: str) -> None:
        """The machine's frames through ``shoal.lab.netem``, already running in the bridge's
        namespace with its TAP devices (``taps``): the machine's port moves to a bridge of its own
        with the first TAP; the second joins the lab's bridge."""
        m = self.machines[name]
        ns = self.bridge_ns
        a, b = self.taps(name)
        side = f"bx-{name}"
        _ip("link", "add", side, "type", "bridge", "forward_delay", "0", ns=ns)
        _ip("link", "set", a, "master", side, "up", ns=ns)
        _ip("link", "set", side, "up", ns=ns)
        _ip("link", "set", b, "master", BRIDGE, "up", ns=ns)
        _ip("link", "set", m.port, "master", side, ns=ns)

    def unimpair(self, name: str) -> None:
        """The machine's port back on the lab's bridge (stop ``shoal.lab.netem`` after this)."""
        m = self.machines[name]
        _ip("link", "set", m.port, "master", BRIDGE, ns=self.bridge_ns)
        _ip("link", "del", f"bx-{name}", ns=self.bridge_ns, check=False)

    def in_machine(self, name: str, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` on machine ``name`` (``BRIDGE``: in the bridge's own
        namespace, where the lab's link impairments run), killed if the lab dies first."""
        ns = self.bridge_ns if name == BRIDGE else self.machines[name].ns
        return ["ip", "netns", "exec", ns, "setpriv", "--pdeathsig", "KILL", "--", *argv]

    def delete(self) -> None:
        if not self.created:
            return
        remove_namespaces([m.ns for m in self.machines.values()] + [self.bridge_ns])
        self.machines.clear()
        self.created = False

    def release(self) -> None:
        """Delete the world and give up the run number."""
        self.delete()
        with contextlib.suppress(OSError):
            f = OWNERS / f"{self.run}.pid"
            if f.read_text().split()[0] == str(os.getpid()):
                f.unlink()
