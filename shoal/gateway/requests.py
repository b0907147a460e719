"""The request path as a service: from a model name (or a pipeline's) to outputs. It resolves the pool
or pipeline a request goes to, builds the pending request (its frame encoded once), submits it to the
dispatcher, waits, and unpacks the answer; it owns request ids. The HTTP app speaks to devices, this
speaks to the dispatcher; neither knows the other's transport.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from shoal.gateway.dispatch import Dispatcher
from shoal.gateway.pipeline import Pipeline
from shoal.gateway.pool import ModelPool, ModelTable, Pending, RequestFailed, rows_of
from shoal.protocol.frames import FrameError
from shoal.protocol.interface import ModelInterface
from shoal.protocol.link_messages import Request
from shoal.protocol.tensors import TensorError, pack_tensors, unpack_tensors

if TYPE_CHECKING:
    from shoal.gateway.tracing import RequestTrace


class Target(NamedTuple):
    """Where a request goes: a model version's pool, or a pipeline; ``spec`` is its interface. (A
    tuple: one is made per request, and a frozen dataclass costs half a microsecond more.)"""

    spec: ModelInterface
    pool: ModelPool | None = None
    pipeline: Pipeline | None = None


class RequestService:
    def __init__(
        self,
        models: ModelTable,
        dispatcher: Dispatcher,
        pipelines: dict[str, Pipeline],
        max_frame_size: int,
    ) -> None:
        self.models = models
        self.dispatcher = dispatcher
        self.pipelines = pipelines
        self.max_frame_size = max_frame_size
        self._ids = itertools.count(1)  # the worker link's ids, unique within this gateway
        self._rids = itertools.count(1)
        self._rid_prefix = os.urandom(4).hex() + "-"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._targets: dict[ModelPool, Target] = {}

    def new_request_id(self) -> str:
        """A request id unique across gateways and restarts: a random prefix and a counter."""
        return f"{self._rid_prefix}{next(self._rids):x}"

    def pipeline(self, name: str, version: str | None) -> Pipeline:
        p = self.pipelines[name]
        if version is not None and version != p.spec.version:
            raise RequestFailed(
                f"pipeline '{name}' has no version '{version}' (it is version {p.spec.version})", 404
            )
        return p

    def target(self, model: str, version: str | None) -> Target:
        """The pool or pipeline ``model`` names (``RequestFailed`` 404/503 when there is none)."""
        if model in self.pipelines:
            pipeline = self.pipeline(model, version)
            try:
                spec = pipeline.interface()
            except RequestFailed as e:
                raise RequestFailed(f"pipeline '{model}' is not ready: {e}", 503) from None
            return Target(spec, pipeline=pipeline)
        pool = self.models.find(model, version)
        t = self._targets.get(pool)
        if t is None or t.spec is not pool.spec:  # made once per pool and interface, not per request
            t = self._targets[pool] = Target(pool.spec, pool=pool)
        return t

    async def run_pipeline(
        self,
        pipeline: Pipeline,
        arrays: dict[str, np.ndarray],
        deadline: float,
        request_id: str,
        *,
        priority: int = 0,
        trace: RequestTrace | None = None,
        told: bool = False,
    ) -> dict[str, np.ndarray]:
        """A pipeline's outputs: each step's requests go through ``call_model`` under the request's id,
        priority, trace and deadline."""
        return await pipeline.run(
            arrays,
            deadline,
            lambda p, a, d: self.call_model(p, a, d, None, request_id, priority=priority, trace=trace, told=told),
        )

    async def call_model(
        self,
        pool: ModelPool,
        arrays: dict[str, np.ndarray],
        deadline: float,
        outputs: list[str] | None = None,
        request_id: str | None = None,
        *,
        raw: bool = False,
        priority: int = 0,
        trace: RequestTrace | None = None,
        told: bool = False,
    ) -> Any:
        """Send one request to a model version's pool and wait for its outputs (as arrays; or, with
        ``raw``, the worker's result header and payload untouched). ``priority`` is Triton's: 1 the
        highest level, 0 the model's default; ``trace``, where the request is traced, gets the call's
        spans; ``told``: the deadline is the client's own, not the gateway's default."""
        p = self.submit(pool, arrays, deadline, outputs, request_id, priority, told)
        try:
            h, payload = await p.future
        except asyncio.CancelledError:  # the client has gone
            self.dispatcher.cancel(p, time.monotonic())
            raise
        if trace is not None:
            trace.model_call(p, h, time.monotonic())
        return (h, payload) if raw else outputs_of(h, payload)

    def submit(
        self,
        pool: ModelPool,
        arrays: dict[str, np.ndarray],
        deadline: float,
        outputs: list[str] | None,
        request_id: str | None,
        priority: int,
        told: bool,
    ) -> Pending:
        """One request handed to the dispatcher, as ``call_model`` sends it; its future is answered
        with the worker's result header and payload. For a caller that waits by callback rather than
        in a task (the HTTP front's common case); ``RequestFailed`` when it is refused at once."""
        specs, bufs = pack_tensors(arrays)
        # The device's request id goes to the worker for its logs.
        header = Request(next(self._ids), specs, outputs, request_id)
        loop = self._loop
        if loop is None:  # kept: in Python 3.11 each get_running_loop() is a getpid system call
            loop = self._loop = asyncio.get_running_loop()
        fut = loop.create_future()
        try:
            p = Pending.of(header, bufs, fut, deadline, rows_of(arrays))
        except FrameError as e:
            raise RequestFailed(f"request too large for the worker link: {e}", 413) from None
        limit = pool.max_frame_size(self.max_frame_size)
        if p.size > limit:
            # Never sent: a worker would drop the whole connection (and every request on it).
            raise RequestFailed(
                f"request of {p.size} bytes exceeds the {limit} bytes the workers of "
                f"'{pool.spec.name}' accept in one frame",
                413,
            )
        if priority:
            p.level = pool.level(priority)
        else:
            p.level = pool.default_level
        p.told = told
        self.dispatcher.submit(pool, p, time.monotonic())
        return p

    def client_left(self, p: Pending) -> None:
        """The client of a request sent by ``submit`` has gone: its future is cancelled and the
        dispatcher takes it out (never run if it had not started)."""
        if not p.future.done():
            p.future.cancel()
            self.dispatcher.cancel(p, time.monotonic())


def outputs_of(h: Any, payload: Any) -> dict[str, np.ndarray]:
    """A worker's result as arrays (``RequestFailed`` 502 when it is malformed)."""
    try:
        return unpack_tensors(h.outputs, payload)
    except TensorError as e:
        raise RequestFailed(f"worker sent a malformed result: {e}", 502) from None
