"""Processes run on the lab's machines (``ip netns exec``), each a ``shoal.local.Child`` with its log
in the run's folder. Only the lab starts them and only the lab ends them, by their process ids: each
runs in a session of its own (its process group is its id, so a signal reaches what it started too),
and dies with the lab if the lab is killed (``World.in_machine``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shoal.lab.world import World
from shoal.local import Child, _env


class Processes:
    def __init__(self, world: World, logs: Path) -> None:
        self.world = world
        self.logs = logs
        self.by_machine: dict[str, list[Child]] = {}
        self.argv: dict[
            int, tuple[str, list[str], dict[str, str] | None, str | None]
        ] = {}  # pid -> how it started

    def spawn(
        self,
        machine: str,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        user: str | None = None,
    ) -> Child:
        """``argv`` on ``machine`` (as ``user`` when given: ``setpriv`` changes to it, then asks for
        the death signal again, since a change of user clears it)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        inner = argv
        if user is not None:
            ids = ["--reuid", user, "--regid", user, "--clear-groups", "--pdeathsig", "KILL", "--"]
            inner = ["setpriv", *ids, *argv]
        with open(log, "ab") as f:
            p = subprocess.Popen(
                self.world.in_machine(machine, inner),
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_env(env),
                start_new_session=True,
            )
        child = Child(name, p, log)
        self.by_machine.setdefault(machine, []).append(child)
        self.argv[child.pid] = (name, argv, env, user)
        return child

    def respawn(self, machine: str) -> list[Child]:
        """Start again, as they were started, the processes of ``machine`` that are no longer running."""
        again = []
        for c in list(self.by_machine.get(machine, [])):
            if c.alive():
                continue
            self.by_machine[machine].remove(c)
            name, argv, env, user = self.argv.pop(c.pid)
            again.append(self.spawn(machine, name, argv, env, user))
        return again

    def shoal(self, machine: str, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        """``shoal ARGS`` on ``machine``."""
        return self.spawn(machine, name, [sys.executable, "-m", "shoal", *args], env)

    def children(self) -> list[Child]:
        return [c for cs in self.by_machine.values() for c in cs]

    @staticmethod
    def _signal_group(child: Child, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)

    def signal_machine(self, machine: str, sig: int) -> None:
        """``sig`` to every process the lab started on ``machine`` (the process only, not its group)."""
        for c in self.by_machine.get(machine, []):
            if c.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.pid, sig)

    def kill_machine(self, machine: str) -> list[int]:
        """SIGKILL every process the lab started on ``machine``; their ids."""
        killed = []
        for c in self.by_machine.get(machine, []):
            if c.alive():
                self._signal_group(c, signal.SIGKILL)
                killed.append(c.pid)
        for c in self.by_machine.get(machine, []):
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.popen.wait(5)
        return killed

    def stop(self, children: list[Child], timeout: float = 15.0) -> None:
        """SIGTERM to all of ``children`` at once, SIGKILL to those still running after ``timeout``."""
        for c in children:
            if c.alive():
                self._signal_group(c, signal.SIGTERM)
        end = time.monotonic() + timeout
        for c in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.popen.wait(max(0.0, end - time.monotonic()))
            if c.alive():
                self._signal_group(c, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.popen.wait(5)

    def stop_all(self, timeout: float = 15.0) -> None:
        self.stop(self.children(), timeout)


def wait_ports(child: Child, path: Path, timeout: float = 60.0) -> dict[str, Any]:
    """The ports a server wrote to its ``--ports-file`` once it listens."""
    end = time.monotonic() + timeout
    while not path.exists():
        if not child.alive() or time.monotonic() > end:
            raise RuntimeError(f"{child.name} did not start:\n{child.tail()}")
        time.sleep(0.05)
    return json.loads(path.read_text())
