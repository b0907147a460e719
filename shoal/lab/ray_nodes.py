"""A Ray cluster on the lab's machines: ``ray start`` in their namespaces, each node on its
machine's address, with Ray's telemetry off (``quiet_ray_env``, a ``ray_bootstrap_config.yaml`` in a
HOME of the node's own) and its temporary folder of its own (short: Ray's socket paths are limited).

* the head: ``ray start --head --block --node-ip-address <its address> --port 6379
  --include-dashboard=false --num-cpus 1``; with ``redis`` (GCS fault tolerance) its control store
  is on that Redis server (``RAY_REDIS_ADDRESS``, ``--redis-password``, and a storage namespace of
  the run's own: ``RAY_external_storage_namespace``), so a head started again finds the cluster's
  state there;
* the other nodes: ``ray start --block --address <head>:6379 --node-ip-address <theirs>
  --num-cpus 1``; the gateway's machine joins with ``--num-cpus 0`` (a Ray driver needs a raylet of
  its own machine; no actor asks for less than one CPU, so none is placed there);
* a Redis server (``/usr/bin/redis-server``) on a machine of its own, with a password, no
  persistence (it is the store that outlives the head, not the data's durable copy).

Every process of a node is ended by the lab by its id: the whole namespace's processes
(``machine_pids``), since ``ray stop`` does not see into namespaces and Ray's workers are not all in
the ``ray start`` process's group.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shoal.autoscale.ray_engine import RAY_ENV, ray_home
from shoal.lab.procs import Processes
from shoal.lab.world import World
from shoal.local import Child

RAY_PORT = 6379
REDIS_PORT = 6379
REDIS_SERVER = "/usr/bin/redis-server"
READY = b"will now block"  # what `ray start --block` says once its node is up


def ray_cli() -> str:
    cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if cli is None:
        raise RuntimeError("the ray command is not installed (pip install 'shoal[ray]')")
    return cli


def machine_pids(ns: str) -> list[int]:
    """Every process in namespace ``ns`` (``ip netns pids``)."""
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=20)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def kill_namespace(ns: str) -> list[int]:
    """SIGKILL every process in namespace ``ns`` (the lab's own); their ids."""
    pids = machine_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def netns_inodes(world: World) -> dict[int, str]:
    """The inode of each machine's network namespace -> the machine (to find where a process runs)."""
    out = {}
    for name, m in world.machines.items():
        with contextlib.suppress(OSError):
            out[os.stat(f"/run/netns/{m.ns}").st_ino] = name
    return out


def machine_of(pid: int, inodes: dict[int, str]) -> str | None:
    """The lab machine process ``pid`` runs on (None: not on one, or gone)."""
    try:
        return inodes.get(os.stat(f"/proc/{pid}/ns/net").st_ino)
    except OSError:
        return None


@dataclass
class RayCluster:
    world: World
    procs: Processes
    workdir: Path
    head: str
    nodes: list[str]  # the other nodes that host workers
    driver: str  # the gateway's machine: a node without CPUs
    redis: str | None = None  # the machine of the Redis server (GCS fault tolerance), or None
    extra_env: dict[str, str] = field(default_factory=dict)  # Ray's settings for every node (RAY_*)
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    children: dict[str, Child] = field(default_factory=dict)  # machine -> its `ray start`
    started: dict[str, float] = field(default_factory=dict)  # machine -> when its node was up (wall clock)

    @property
    def address(self) -> str:
        return f"{self.world.machines[self.head].address}:{RAY_PORT}"

    temp_dirs: list[str] = field(default_factory=list)  # every node's temporary folder so far

    def temp_dir(self, machine: str) -> str:
        """A folder of its own for each start of a node: ``ray start --head`` refuses to start where
        its folder names a cluster at its address whose GCS address a raylet's command line on this
        host still shows (the other machines' raylets, as Ray sees every process of the host)."""
        n = sum(1 for d in self.temp_dirs if d.startswith(f"/tmp/shoal-ray-{self.world.run}-{machine}."))
        return f"/tmp/shoal-ray-{self.world.run}-{machine}.{n}"

    def env(self, machine: str) -> dict[str, str]:
        """The environment of every process that starts Ray or joins it as a driver on ``machine``."""
        home = self.workdir / "home" / machine
        ray_home(home)
        # A node of a cluster of several machines: Ray refuses to join one where
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is 0 (RAY_ENV's value for a cluster on loopback); the
        # address is given (--node-ip-address), so nothing is probed for either way.
        env = {**RAY_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", **self.extra_env, "HOME": str(home)}
        if machine == self.head and self.redis is not None:
            env["RAY_REDIS_ADDRESS"] = f"{self.world.machines[self.redis].address}:{REDIS_PORT}"
            env["RAY_external_storage_namespace"] = f"shoal-lab-{self.world.run}"
        return env

    def driver_env(self) -> dict[str, str]:
        """The gateway's environment: a HOME with the bootstrap file; Ray's settings are left to
        shoal's engine (``quiet_ray_env``), as for a gateway started by hand."""
        home = self.workdir / "home" / self.driver
        ray_home(home)
        return {"HOME": str(home)}

    def argv(self, machine: str) -> list[str]:
        ip = self.world.machines[machine].address
        common = [
            "--block", "--node-ip-address", ip, "--num-gpus", "0", "--disable-usage-stats",
            "--temp-dir", self.temp_dir(machine),
        ]  # fmt: skip
        if machine == self.head:
            cmd = [ray_cli(), "start", "--head", "--port", str(RAY_PORT), "--include-dashboard=false", "--num-cpus", "1"]
            if self.redis is not None:
                cmd += ["--redis-password", self.password]
            return [*cmd, *common]
        cpus = "0" if machine == self.driver else "1"
        return [ray_cli(), "start", "--address", self.address, "--num-cpus", cpus, *common]

    def start_redis(self, timeout: float = 30.0) -> None:
        assert self.redis is not None
        rdir = self.workdir / "redis"
        rdir.mkdir(parents=True, exist_ok=True)
        ip = self.world.machines[self.redis].address
        argv = [
            REDIS_SERVER, "--bind", ip, "--port", str(REDIS_PORT), "--requirepass", self.password,
            "--save", "", "--appendonly", "no", "--dir", str(rdir), "--daemonize", "no",
        ]  # fmt: skip
        child = self.procs.spawn(self.redis, "redis", argv)
        self._wait_log(child, b"Ready to accept connections", timeout)

    def start_node(self, machine: str) -> Child:
        argv = self.argv(machine)
        self.temp_dirs.append(argv[argv.index("--temp-dir") + 1])
        child = self.procs.spawn(machine, f"ray-{machine}", argv, self.env(machine))
        self.children[machine] = child
        return child

    def _wait_log(self, child: Child, what: bytes, timeout: float, since: int = 0) -> None:
        end = time.monotonic() + timeout
        while what not in child.log.read_bytes()[since:]:
            if not child.alive() or time.monotonic() > end:
                raise RuntimeError(f"{child.name} did not start within {timeout:g} s:\n{child.tail(30)}")
            time.sleep(0.1)

    def wait_node(self, machine: str, timeout: float = 120.0, since: int = 0) -> None:
        self._wait_log(self.children[machine], READY, timeout, since)
        self.started[machine] = time.time()

    def start(self, timeout: float = 180.0) -> None:
        """Redis (if any), the head, then every other node at once."""
        if self.redis is not None:
            self.start_redis()
        self.start_node(self.head)
        self.wait_node(self.head, timeout)
        for m in [*self.nodes, self.driver]:
            self.start_node(m)
        for m in [*self.nodes, self.driver]:
            self.wait_node(m, timeout)

    def restart_head(self, timeout: float = 120.0) -> float:
        """The head's ``ray start`` again on its machine, as it was started; when it is up (wall clock)."""
        old = self.children[self.head]
        self.procs.by_machine[self.head].remove(old)
        self.procs.argv.pop(old.pid, None)
        size = old.log.stat().st_size if old.log.exists() else 0
        self.start_node(self.head)
        self.wait_node(self.head, timeout, since=size)
        return self.started[self.head]

    def crash(self, machine: str) -> list[int]:
        """The machine lost: its link down, then every process in it SIGKILLed (Ray's included)."""
        self.world.set_link(machine, False)
        killed = kill_namespace(self.world.machines[machine].ns)
        child = self.children.get(machine)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(5)
        return killed

    def stop(self) -> None:
        """Every process of every node, by id (whatever the lab's own process list holds is stopped
        by ``Processes.stop_all`` too), and the nodes' temporary folders."""
        for m in [self.driver, *self.nodes, self.head]:
            if m in self.world.machines:
                kill_namespace(self.world.machines[m].ns)
        keep = self.workdir / "ray-logs"
        for d in self.temp_dirs:
            for f in Path(d).glob("session_*/logs/*"):  # Ray's own logs (GCS, raylets), kept
                if f.is_file() and f.suffix in (".out", ".err", ".log") and f.stat().st_size < 20_000_000:
                    dest = keep / Path(d).name / f.parent.parent.name / f.name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with contextlib.suppress(OSError):
                        shutil.copy(f, dest)
            shutil.rmtree(d, ignore_errors=True)
