"""Pools of workers per model and version: what the gateway knows of each model version (its
interface, its workers, its queue, its load), and the table of all of them. State only: what happens
to a request, from arrival to answer, is the dispatcher's (``dispatch.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from shoal.gateway.policy import Patience, VersionPolicy, ewma, newest_version, visible_versions
from shoal.gateway.request_queue import RequestQueue
from shoal.protocol.frames import MsgType, encode_frame
from shoal.protocol.interface import ModelInterface
from shoal.protocol.joined import join_key
from shoal.protocol.link_messages import Request


class RequestFailed(Exception):
    """A request that will not be answered with outputs; ``status`` is the HTTP status to use."""

    def __init__(
        self, message: str, status: int = 500, retry_after: int | None = None, retry_after_ms: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds (``Retry-After``)
        self.retry_after_ms = retry_after_ms  # the same hint to the millisecond, where it is known
        self.request_id: str | None = None


class WorkerHandle(Protocol):
    """A worker as the dispatcher sees it. ``in_flight`` and ``latency_ewma_ms`` are the dispatcher's
    to change; the link adapter writes the requests it is given and says when the worker goes."""

    worker_id: str
    in_flight: int
    capacity: int
    latency_ewma_ms: float
    accepting: bool
    max_frame_size: int

    def send_request(self, p: Pending) -> None: ...

    def cancel(self, rid: int) -> None:
        """A request it holds whose client left: it drops it unless it is running."""

    def drain(self) -> None:
        """Ask the worker to drain: it finishes what it holds and leaves."""

    def describe(self) -> dict[str, Any]:
        """What the status shows of it."""


@dataclass(eq=False, slots=True)
class Pending:
    """One request between its arrival and its answer (kept whole so it can be sent again): its
    REQUEST frame is encoded once, before it is queued, so a request the link cannot carry fails
    before it touches any worker."""

    id: int
    frame: list[Any]  # the encoded REQUEST frame's buffers, written as they are
    future: asyncio.Future
    deadline: float
    rows: int = 1
    # What joining it with others into one REQUESTS takes (``protocol/joined.py``): its header, its
    # payload buffers and their size, and its join key (None: it is always sent alone).
    header: Any = None
    bufs: list[Any] | None = None
    size: int = 0
    join_key: tuple | None = None
    attempts: int = 0
    level: int = 0  # its priority level in the queue (0 first)
    told: bool = False  # its client said its deadline (else it is the gateway's --timeout)
    t_enqueued: float = 0.0
    t_sent: float = 0.0
    worker: Any = None
    pool: Any = None

    @staticmethod
    def of(header: Request, bufs: list[Any], future: asyncio.Future, deadline: float, rows: int) -> Pending:
        """A request as it arrives: its REQUEST frame encoded (``FrameError`` when the link cannot
        carry it) and its join key computed, once."""
        frame = encode_frame(MsgType.REQUEST, header, bufs)
        key, _ = join_key(header.inputs, header.outputs)
        return Pending(header.id, frame, future, deadline, rows, header, bufs, sum(len(b) for b in frame), key)


class ModelPool:
    """The live workers of one model version and the requests waiting for them."""

    def __init__(
        self, spec: ModelInterface, max_queue: int, max_attempts: int, levels: int = 1, default_level: int = 0
    ) -> None:
        self.spec = spec
        self.workers: list[WorkerHandle] = []
        self.queue = RequestQueue(levels)
        self.default_level = min(max(0, default_level), levels - 1)
        self.max_queue = max_queue
        self.max_attempts = max_attempts
        self.no_worker_since: float | None = time.monotonic()
        # An engine can start workers for this version: requests wait for one (up to their deadline)
        # instead of failing when none is live. Unloaded by an operator: refused at once.
        self.wakeable = False
        self.unloaded = False
        # Why its workers cannot start (its model fails to load), once an engine gave up on it: its
        # requests are answered 503 with this at once, until an operator loads it again.
        self.unavailable: str | None = None
        # Load as the autoscaler reads it: counters it differentiates over its sampling interval.
        self.arrivals = 0
        self.busy_ms = 0.0  # model time spent on this version's requests
        self.service_ms = 0.0  # recent model time of one request (its share of its batch)
        self.on_wait: Callable[[], None] | None = None
        # How fast the pool answers while requests wait for it (its workers all busy): seconds per
        # request, measured over windows of answers (``answered``); 0 until measured.
        self.per_request_s = 0.0
        self._window_start = 0.0
        self._window_answers = 0
        self.shed = 0  # requests refused at arrival: their answer was predicted after their deadline
        self.cancelled = 0  # requests whose client left before the answer
        self.patience = Patience()  # how long its clients wait, learned from those that left
        self.unread_ms = 0.0  # model time spent on answers nobody read (client gone, deadline passed)

    def level(self, priority: int) -> int:
        """The queue level of a request's ``priority`` (Triton's: 1 the highest, 0 the default)."""
        if priority <= 0:
            return self.default_level
        return min(priority, len(self.queue.levels)) - 1

    def answered(self, now: float) -> None:
        """A request was answered. While others wait, the pool's service time per request is the time
        between answers: measured over windows of at least 32 answers and 50 ms, each closed by the
        first answer of a later arrival (answers that arrive together, a batch's, stay together)."""
        if not self.queue:
            self._window_start = 0.0
            return
        if self._window_start == 0.0:
            self._window_start, self._window_answers = now, 1
            return
        dt = now - self._window_start
        if self._window_answers >= WINDOW_ANSWERS and dt >= WINDOW_S:
            self.per_request_s = ewma(self.per_request_s, dt / self._window_answers, 0.3)
            self._window_start, self._window_answers = now, 1
        else:
            self._window_answers += 1

    def predicted_wait_s(self, level: int) -> float | None:
        """How long a request of ``level`` queued now waits for its answer: the requests before it
        (queued at its level or above, and those the workers hold) at the measured service time per
        request, or at the model's own time per request over the live workers until that is measured;
        None when neither is known yet."""
        per = self.per_request_s
        if per <= 0.0:
            n = sum(1 for w in self.workers if w.accepting)
            if n == 0 or self.service_ms <= 0.0:
                return None
            per = self.service_ms / 1000.0 / n
        return (self.queue.ahead_of(level) + self.in_flight + 1) * per

    @property
    def ready(self) -> bool:
        return any(w.accepting for w in self.workers)

    @property
    def asleep(self) -> bool:
        """No worker now, but an engine starts one for the first request: servable after a delay."""
        return (
            self.wakeable
            and not self.unloaded
            and self.unavailable is None
            and not any(w.accepting for w in self.workers)
        )

    @property
    def capacity(self) -> int:
        return sum(w.capacity for w in self.workers if w.accepting)

    @property
    def in_flight(self) -> int:
        return sum(w.in_flight for w in self.workers)

    def max_frame_size(self, default: int) -> int:
        """The largest request frame every live worker of this version accepts."""
        return min((w.max_frame_size for w in self.workers), default=default)

    def latency_ms(self) -> float:
        lat = [w.latency_ewma_ms for w in self.workers if w.latency_ewma_ms > 0]
        return sum(lat) / len(lat) if lat else 0.0

WINDOW_ANSWERS = 32
WINDOW_S = 0.05


class ModelTable:
    """All pools of a gateway: model name -> version -> pool."""

    def __init__(
        self,
        max_queue: int = 1024,
        max_attempts: int = 5,
        version_policies: dict[str, VersionPolicy] | None = None,
        priorities: Priorities | None = None,
    ) -> None:
        self.models: dict[str, dict[str, ModelPool]] = {}
        self.max_queue = max_queue
        self.max_attempts = max_attempts
        self.priorities = priorities or Priorities()
        self.version_policies = version_policies or {}  # model -> policy.parse_version_policy's value
        self.expected: set[str] = set()
        self.grace_until = 0.0

    def expect(self, models: set[str], grace_s: float) -> None:
        """Models the configuration names, and how long after start any model may be missing only
        because its workers have not rejoined yet: a request for those is 503 (try again), not 404."""
        self.expected = set(models)
        self.grace_until = time.monotonic() + grace_s

    def unknown(self, model: str) -> RequestFailed:
        if model in self.expected:
            return RequestFailed(f"model '{model}' has no live worker yet", 503, 1)
        if time.monotonic() < self.grace_until:
            return RequestFailed(
                f"model '{model}' is not here yet: the gateway has just started and its workers are "
                "joining; try again",
                503,
                1,
            )
        return RequestFailed(f"unknown model '{model}'", 404)

    def served_versions(self, model: str) -> set[str]:
        """Versions of a model this gateway routes to: those with live workers, under the model's policy."""
        versions = self.models.get(model, {})
        live = [v for v, p in versions.items() if p.ready]
        return visible_versions(self.version_policies.get(model), live)

    def pool_for_worker(self, spec: ModelInterface) -> ModelPool:
        """The pool a new worker joins; raises ValueError when it disagrees with its peers."""
        versions = self.models.setdefault(spec.name, {})
        pool = versions.get(spec.version)
        if pool is None:
            pr = self.priorities
            default = pr.defaults.get(spec.name, pr.default)
            pool = versions[spec.version] = ModelPool(
                spec, self.max_queue, self.max_attempts, pr.levels, default - 1
            )
        elif not pool.spec.same_interface(spec):
            if pool.workers:
                raise ValueError(
                    f"inputs/outputs differ from the live workers of {spec.name} version {spec.version}"
                )
            pool.spec = spec  # no live worker: the newcomer defines the interface
        return pool

    def declare(self, spec: ModelInterface, on_wait: Callable[[], None] | None = None) -> ModelPool:
        """A model version an engine serves, known before any worker joins (its interface read from
        the model repository), so requests for it are checked and queued while a worker starts;
        ``on_wait`` is told when a request waits for a worker (the engine starts one)."""
        pool = self.pool_for_worker(spec)
        pool.wakeable = True
        pool.on_wait = on_wait
        self.expected.add(spec.name)
        return pool

    def find(self, model: str, version: str | None) -> ModelPool:
        pool = self._find(model, version)
        if pool.unloaded:
            raise RequestFailed(f"model '{model}' version {pool.spec.version} is unloaded", 404)
        if pool.unavailable is not None and not pool.ready:
            raise RequestFailed(f"model '{model}' version {pool.spec.version} is unavailable: {pool.unavailable}", 503)
        return pool

    def _find(self, model: str, version: str | None) -> ModelPool:
        versions = self.models.get(model)
        if not versions:
            raise self.unknown(model)
        policy = self.version_policies.get(model)
        if version is None and policy is None and len(versions) == 1:
            return next(iter(versions.values()))  # the common case: one version, no policy
        if version is not None:
            pool = versions.get(version)
            if pool is None:
                raise RequestFailed(f"model '{model}' has no version '{version}'", 404)
            if policy is not None and pool.ready and version not in self.served_versions(model):
                raise RequestFailed(
                    f"version '{version}' of '{model}' is not served (version policy: {policy.kind})", 404
                )
            return pool
        v = newest_version(self.served_versions(model)) or newest_version(versions)
        assert v is not None
        return versions[v]

    def pools(self) -> list[ModelPool]:
        return [p for vs in self.models.values() for p in vs.values()]

    def all_ready(self) -> bool:
        """Every model can be served: a live worker, or an engine that starts one for the first request
        (asleep). Unloaded models do not count."""
        live = [vs for vs in self.models.values() if any(not p.unloaded for p in vs.values())]
        return bool(live) and all(any(p.ready or p.asleep for p in vs.values()) for vs in live)


@dataclass(frozen=True)
class Priorities:
    """Priority levels (Triton's ``priority_levels``): how many, the default level of a request that
    names none (1 the highest), and per model a default of its own."""

    levels: int = 2
    default: int = 2
    defaults: dict[str, int] = field(default_factory=dict)


def rows_of(arrays: dict[str, np.ndarray]) -> int:
    for a in arrays.values():
        return int(a.shape[0]) if a.ndim else 1
    return 1
