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
import logging
import os
import signal
import sys
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
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
    proc: asyncio.subprocess.Process
    log_path: Path
    info: dict[str, Any] = field(default_factory=dict)

    def exit_code(self) -> int | None:
        return self.proc.returncode

    def describe(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "pid": self.proc.pid, "log": str(self.log_path)}


class LocalEngine(Engine):
    """Worker processes on this machine: ``python -m shoal worker ...``, one log file each."""

    name = "local"

    def __init__(self, cfg: AutoscaleConfig) -> None:
        self.workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="shoal-workers-"))

    async def launch(self, req: WorkerLaunch) -> EngineWorker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"{req.worker_id}.log"
        env = {**os.environ, "SHOAL_CLUSTER_SECRET": req.secret.decode(), "PYTHONUNBUFFERED": "1"}
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
                    env=env,
                )
        except OSError as e:
            raise EngineError(f"cannot start a worker process: {e}") from None
        return LocalWorker(req.worker_id, proc, log_path)

    async def terminate(self, w: EngineWorker) -> None:
        assert isinstance(w, LocalWorker)
        p = w.proc
        if p.returncode is not None:
            return
        try:
            p.send_signal(signal.SIGTERM)  # it drains what it still holds (nothing, normally)
            await asyncio.wait_for(p.wait(), 10.0)
        except asyncio.TimeoutError:
            p.kill()
            await p.wait()
        except ProcessLookupError:
            pass

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
