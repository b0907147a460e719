"""Where workers run: one small interface, an engine per place. The controller decides how many
workers a model needs and which to drain; an engine only starts a worker process somewhere, tells
whether it is still running, and stops it when asked (after a drain that did not end, or a start that
never joined).

* ``local``: ``shoal worker`` processes on this machine (the demo, tests, small sites).
* ``ray``: workers as Ray actors placed by resources over a Ray cluster (``ray_engine.py``).
* ``kubernetes``: nothing is started here; the gateway exports the desired count as a metric and the
  cluster's own autoscaler (KEDA or the HPA, ``deploy/kubernetes``) acts on it.

Workers dial the gateway and log in like any other; the engine names each one (``--worker-id``) so
the controller knows which joined worker it started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.autoscale.config import AutoscaleConfig, ModelScale

log = logging.getLogger("shoal.autoscale")


class EngineError(Exception):
    """The engine could not start a worker; the message says why (for status and logs)."""


@dataclass
class WorkerLaunch:
    """What the controller asks an engine to start."""

    worker_id: str
    model: str
    version: str
    scale: ModelScale
    gateway: str  # host:port of the worker port
    secret: bytes
    repo: str


class EngineWorker(ABC):
    worker_id: str

    @abstractmethod
    def exit_code(self) -> int | None:
        """None while it runs; its exit status once it has ended."""

    def describe(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id}


class Engine(ABC):
    name = "engine"
    external = False  # True: workers are started by someone else (Kubernetes); nothing to launch

    async def start(self) -> None:  # noqa: B027 (most engines have nothing to connect to)
        """Connect to where workers run (a Ray cluster); called once when the gateway starts."""

    async def stop(self, workers: list[EngineWorker]) -> None:
        """The gateway is stopping: end the workers this engine started."""
        for w in workers:
            await self.terminate(w)

    @abstractmethod
    async def launch(self, req: WorkerLaunch) -> EngineWorker:
        """Start one worker; raise ``EngineError`` when it cannot be started."""

    @abstractmethod
    async def terminate(self, w: EngineWorker) -> None:
        """Stop a worker now (it has been drained already, or never joined)."""

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name}


def worker_argv(req: WorkerLaunch) -> list[str]:
    """The ``shoal worker`` command line every engine runs (an engine adds its own interpreter)."""
    return [
        "worker",
        "--gateway",
        req.gateway,
        "--repo",
        req.repo,
        "--model",
        req.model,
        "--version",
        req.version,
        "--worker-id",
        req.worker_id,
        *req.scale.worker_args,
    ]


# ------------------------------------------------------------------------------------------ local


@dataclass
class LocalWorker(EngineWorker):
    worker_id: str
    pid: int
    log_path: Path
    exits: dict[int, int]  # pid -> exit status, filled as children end
    proc: asyncio.subprocess.Process | None = None  # when started without the zygote

    def exit_code(self) -> int | None:
        if self.proc is not None:
            return self.proc.returncode
        return self.exits.get(self.pid)

    def describe(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "pid": self.pid, "log": str(self.log_path)}


class LocalEngine(Engine):
    """Worker processes on this machine, one log file each. They are forked by a pre-started
    interpreter that has imported what a worker needs (``zygote.py``), so a worker starts in tens
    of milliseconds plus its model's loading; without it (it failed to start, or died), each worker
    is a fresh ``python -m shoal worker`` process."""

    name = "local"

    def __init__(self, cfg: AutoscaleConfig) -> None:
        self.workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="shoal-workers-"))
        self._zygote: asyncio.subprocess.Process | None = None
        self._answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._exits: dict[int, int] = {}
        self._reader: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one command in flight to the zygote at a time

    async def start(self) -> None:
        try:
            self._zygote = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "shoal.autoscale.zygote",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError as e:
            log.warning("no pre-started worker interpreter (%s): each worker starts a fresh process", e)
            return
        self._reader = asyncio.create_task(self._read(), name="zygote")

    async def _read(self) -> None:
        assert self._zygote is not None and self._zygote.stdout is not None
        while line := await self._zygote.stdout.readline():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "exited" in msg:
                self._exits[int(msg["exited"])] = int(msg["code"])
            else:
                await self._answers.put(msg)
        log.warning("the pre-started worker interpreter ended; workers start as fresh processes")
        self._zygote = None

    async def launch(self, req: WorkerLaunch) -> EngineWorker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"{req.worker_id}.log"
        extra = {"SHOAL_CLUSTER_SECRET": req.secret.decode(), "PYTHONUNBUFFERED": "1"}
        z = self._zygote
        if z is not None and z.stdin is not None:
            cmd = {"argv": worker_argv(req), "env": extra, "log": str(log_path)}
            async with self._lock:
                try:
                    z.stdin.write((json.dumps(cmd) + "\n").encode())
                    await z.stdin.drain()
                    answer = await asyncio.wait_for(self._answers.get(), 10.0)
                except (OSError, asyncio.TimeoutError, ConnectionError) as e:
                    answer = {"error": f"the pre-started interpreter did not answer: {e}"}
            if "started" in answer:
                return LocalWorker(req.worker_id, int(answer["started"]), log_path, self._exits)
            log.warning("%s; starting a fresh process instead", answer.get("error"))
        try:
            with open(log_path, "ab") as out:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "shoal",
                    *worker_argv(req),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env={**os.environ, **extra},
                )
        except OSError as e:
            raise EngineError(f"cannot start a worker process: {e}") from None
        return LocalWorker(req.worker_id, proc.pid, log_path, self._exits, proc)

    async def terminate(self, w: EngineWorker) -> None:
        assert isinstance(w, LocalWorker)
        if w.exit_code() is not None:
            return
        try:
            os.kill(w.pid, signal.SIGTERM)  # it drains what it still holds (nothing, normally)
            for _ in range(200):  # 10 s; the event loop's child watcher (or the zygote) records the exit
                if w.exit_code() is not None:
                    return
                await asyncio.sleep(0.05)
            os.kill(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def stop(self, workers: list[EngineWorker]) -> None:
        await asyncio.gather(*(self.terminate(w) for w in workers))
        z = self._zygote
        if z is not None and z.stdin is not None:
            z.stdin.close()
            try:
                await asyncio.wait_for(z.wait(), 10.0)
            except asyncio.TimeoutError:
                z.kill()
        if self._reader is not None:
            self._reader.cancel()

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "workdir": str(self.workdir)}


# ------------------------------------------------------------------------------------- kubernetes


class ExternalEngine(Engine):
    """Kubernetes (or any orchestrator that reads the desired count from the gateway's metrics)."""

    name = "kubernetes"
    external = True

    async def launch(self, req: WorkerLaunch) -> EngineWorker:
        raise EngineError("workers are started by the cluster's autoscaler, not by the gateway")

    async def terminate(self, w: EngineWorker) -> None:
        return None


def make_engine(cfg: AutoscaleConfig) -> Engine:
    if cfg.engine == "local":
        return LocalEngine(cfg)
    if cfg.engine == "kubernetes":
        return ExternalEngine()
    from shoal.autoscale.ray_engine import RayEngine  # imports ray: only when configured

    return RayEngine(cfg)
