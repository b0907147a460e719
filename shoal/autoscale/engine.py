"""What an engine is, as the controller sees it: start a worker somewhere (``launch``), tell whether it
still runs (``EngineWorker.exit_code``), stop it (``terminate``). The engines themselves are in
``engines.py`` (local, Kubernetes) and ``ray_engine.py``; this interface is apart so that they, the
controller and the factory depend on it and not on one another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from shoal.autoscale.config import ModelScale


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
