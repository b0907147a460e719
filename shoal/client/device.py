"""The device client: ask central for a route once, cache it, talk to the cluster directly over
keep-alive connections, and survive cluster failures and a central outage.

    from shoal.client import Client
    c = Client("https://central:7000", device="cam-7", password="...")
    r = c.infer("mnist-cnn", image=open("digit.png", "rb").read())
    print(r.label("logits"), r.cluster, r.latency_ms)

    async with AsyncClient("https://central:7000", "cam-7", "...") as c:   # many requests in flight
        results = await asyncio.gather(*(c.infer("mnist-cnn", image=png) for png in images))

The rules (routes, retries, fail-over) are written once, free of I/O, in ``core.py``; ``Client`` runs
them blocking and ``AsyncClient`` in asyncio, each over one httpx connection pool.

With a model of its own (``local=MODEL_DIR``, ``pip install 'shoal[edge]'``) a client decides per
request where it runs (``policy``: local, remote, fastest, cascade, split; ``edge.py`` and
``placement.py``), and sends raw camera frames (``frame=``) as JPEG or PNG.
"""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from shoal.client.core import (
    Call,
    ClientCore,
    Compute,
    Finished,
    Flow,
    InferError,
    InferResult,
    Race,
    Route,
    RouteError,
    resume,
)
from shoal.client.edge import DEFAULT_QUALITY, Edge, LocalModel
from shoal.client.http import arace, asend, new_async_client, new_client, race, send

__all__ = ["AsyncClient", "Client", "InferError", "InferResult", "Route", "RouteError"]


class _Operations(ABC):
    """The device operations, written once: each runs its flow through the class's ``_run`` (which
    answers the result in ``Client`` and an awaitable of it in ``AsyncClient``)."""

    def __init__(
        self,
        central: str | list[str],
        device: str,
        password: str,
        timeout: float = 10.0,
        retries: int = 6,
        ca_file: str | None = None,
        compress_above: int = 4096,
        local: str | Path | LocalModel | None = None,
        policy: str = "remote",
        threshold: float = 0.9,
    ) -> None:
        self.core = ClientCore(central, device, password, retries, compress_above, timeout=timeout)
        self._renewing: set[asyncio.Task] = set()  # routes asked for again, probes (AsyncClient)
        self.edge = Edge(self.core, local, policy, threshold)
        self.timeout = timeout
        self._http = self._connect(timeout, ca_file)

    @abstractmethod
    def _connect(self, timeout: float, ca_file: str | None) -> Any:
        """The HTTP client the subclass runs its flows on (blocking or asyncio)."""

    @abstractmethod
    def _run(self, flow: Flow[Any]) -> Any:
        """Carry out ``flow``'s calls: the result (blocking), or an awaitable of it (asyncio)."""

    def route(self, model: str, version: str | None = None, exclude: set[str] | None = None) -> Any:
        """A ``Route`` for the model: cached, else from central (each replica in turn), else, while
        central is unreachable, the last one it gave."""
        return self._run(self.core.route(model, version, exclude))

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray] | None = None,
        image: bytes | None = None,
        version: str | None = None,
        *,
        frame: np.ndarray | None = None,
        policy: str | None = None,
        budget_ms: float | None = None,
        frame_format: str = "jpeg",
        quality: int = DEFAULT_QUALITY,
        traceparent: str | None = None,
    ) -> Any:
        """An ``InferResult``: tensors (``inputs``), encoded image bytes (``image``) or a raw camera
        frame (``frame``, sent as ``frame_format`` at ``quality``) through the least-loaded cluster
        serving the model, failing over as ``core.py`` says; or, with a local model, where ``policy``
        (the client's by default) places it within ``budget_ms``. The result says where it ran.
        ``traceparent`` (W3C) puts the request in the caller's trace, at central and at the gateway;
        without one, a request that asks central for its route goes on in central's trace of it
        when central traces (``core.py``)."""
        return self._run(
            self.edge.infer(
                model, inputs, image, frame, version, policy, budget_ms, frame_format, quality, traceparent
            )
        )

    def commands(self, wait_s: float = 25.0) -> Any:
        """Management commands an operator posted for this device (long poll: waits up to ``wait_s``
        for one to arrive). Acknowledge each with ``ack`` once carried out."""
        return self._run(self.core.commands(wait_s, self.timeout))

    def ack(self, command_id: int, result: Any = None) -> Any:
        """Tell central a command was carried out (with an optional result)."""
        return self._run(self.core.ack(command_id, result))


class Client(_Operations):
    """Blocking device client. One per thread."""

    _connect = staticmethod(new_client)

    def _run(self, flow: Flow[Any]) -> Any:
        value = self._drive(flow)
        for probe in self.core.probes():  # liveness probes of silent gateways: never hold the caller
            threading.Thread(target=self._drive, args=(probe,), daemon=True, name="shoal-probe").start()
        for renewal in self.core.renewals():  # routes due again: asked for after the answer is in hand
            self._run(renewal)
        return value

    def _drive(self, flow: Flow[Any]) -> Any:
        outcome: Any = None
        while not isinstance(step := resume(flow, outcome), Finished):
            if isinstance(step, Compute):
                outcome = step.fn()
            elif isinstance(step, Call):
                outcome = send(self._http, step)
            elif isinstance(step, Race):
                outcome = race(self._http, step.calls)
            else:
                time.sleep(step.seconds)
                outcome = None
        return step.value

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Operations):
    """The asyncio device client: the same rules; any number of tasks may share one, their requests
    in flight at once over its connection pool."""

    _connect = staticmethod(new_async_client)

    async def _run(self, flow: Flow[Any]) -> Any:
        outcome: Any = None
        while not isinstance(step := resume(flow, outcome), Finished):
            if self.core.to_probe:  # a probe starts as soon as its gateway fell silent
                self._background()
            if isinstance(step, Compute):  # the local model in a thread: other requests go on meanwhile
                outcome = await asyncio.to_thread(step.fn)
            elif isinstance(step, Call):
                outcome = await self._send(step)
            elif isinstance(step, Race):
                outcome = await arace(self._http, step.calls)
            else:
                await asyncio.sleep(step.seconds)
                outcome = None
        self._background()
        return step.value

    async def _send(self, call: Call) -> Any:
        """One exchange; still unanswered after ``call.slow_after``, ``call.on_slow`` is called and
        what it put in the background started, while the exchange goes on."""
        if call.on_slow is None or call.slow_after is None:
            return await asend(self._http, call)
        task = asyncio.ensure_future(asend(self._http, call))
        try:
            done, _ = await asyncio.wait({task}, timeout=call.slow_after)
            if not done:
                call.on_slow()
                self._background()
            return await task
        except asyncio.CancelledError:
            task.cancel()
            raise

    def _background(self) -> None:
        """Routes due again and probes of silent gateways, beside the requests: none waits for them."""
        for flow in self.core.background():
            task = asyncio.create_task(self._run(flow))
            self._renewing.add(task)
            task.add_done_callback(self._renewing.discard)

    async def close(self) -> None:
        for task in list(self._renewing):
            task.cancel()
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
