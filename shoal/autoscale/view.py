"""What the autoscaler reads of a model version's pool, and what it may ask of the one who owns the
pools (the gateway's dispatcher): declared here, so the controller depends on these and not on the
gateway. Reads are attributes; every change goes through ``PoolControl``."""

from __future__ import annotations

from collections.abc import Callable, Sequence, Sized
from typing import Any, Protocol


class LiveWorker(Protocol):
    worker_id: str
    accepting: bool
    in_flight: int
    capacity: int  # what this gateway may send it (its share, when it serves several gateways)
    size: int  # its whole capacity, as it announced it
    joined_at: float  # monotonic time it joined
    cpu_rate: float  # fraction of a core its process used recently


class PoolView(Protocol):
    """A model version's pool, read-only."""

    @property
    def workers(self) -> Sequence[LiveWorker]: ...

    @property
    def queue(self) -> Sized: ...

    @property
    def ready(self) -> bool: ...

    @property
    def in_flight(self) -> int: ...

    arrivals: int  # requests that arrived, ever
    busy_ms: float  # model time spent on its requests, ever
    service_ms: float  # recent model time of one request
    on_wait: Callable[[], None] | None


class PoolControl(Protocol):
    """The changes the autoscaler makes to pools and workers, made by their owner."""

    def unload(self, pool: Any, now: float) -> None: ...

    def load(self, pool: Any) -> None: ...

    def wake(self, pool: Any) -> None: ...

    def give_up(self, pool: Any, reason: str) -> None: ...

    def drain_worker(self, pool: Any, worker: Any, now: float) -> None: ...
