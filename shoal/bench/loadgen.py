"""A lean HTTP/1.1 load generator: many keep-alive connections, each sending one request at a time.

Simulated devices for the demo and the benchmarks. Requests are prebuilt bytes; the response parser
reads just the status, ``Content-Length`` and the body, so the generator costs the measured server as
little of the shared CPU as possible.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


def http_request(path: str, body: bytes, headers: dict[str, str], host: str = "127.0.0.1") -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    opened: float = 0.0  # when every connection was open
    deadline: float = float("inf")  # a timed run's end: no request is sent after it
    answered_at: list[float] = field(default_factory=list)  # when each measured answer came
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def count(self) -> int:
        return len(self.latencies_s)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def elapsed_s(self) -> float:
        return max(1e-9, self.ended - self.started)

    @property
    def rps(self) -> float:
        return self.count / self.elapsed_s

    def steady_rps(self, settle_s: float = 0.1) -> float:
        """Answers per second once every connection was open (and ``settle_s`` more) until the
        deadline: the rate at steady state, without the opening of the connections and the drain of
        what is in flight at the end, which ``rps`` counts (they weigh in short runs)."""
        t0, t1 = self.opened + settle_s, min(self.deadline, self.ended)
        if t1 <= t0:
            return self.rps
        return sum(1 for t in self.answered_at if t0 <= t <= t1) / (t1 - t0)

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_s), q) * 1000.0)


class _Conn(asyncio.Protocol):
    def __init__(self, gen: LoadGenerator) -> None:
        self.gen = gen
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.t0 = 0.0
        self.index = -1
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send_next()

    def send_next(self) -> None:
        i = self.gen.next_index()
        if i is None:
            assert self.transport is not None
            self.transport.close()
            return
        self.index = i
        req = self.gen.make_request(i)
        self.gen.result.bytes_sent += len(req)
        self.t0 = time.perf_counter()
        assert self.transport is not None
        self.transport.write(req)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            # Anchor at a line start: "inference-header-content-length" must not match.
            cl_at = head.find(b"\r\ncontent-length:")
            if cl_at < 0:
                self.gen.fail(f"response without Content-Length: {head[:80]!r}")
                assert self.transport is not None
                self.transport.close()
                return
            eol = head.find(b"\r\n", cl_at + 2)
            cl = int(head[cl_at + 17 : eol if eol > 0 else len(head)])
            total = end + 4 + cl
            if len(self.buf) < total:
                return
            status = int(head[9:12])
            body = bytes(self.buf[end + 4 : total])
            del self.buf[:total]
            self.gen.record(self.index, status, head, body, time.perf_counter() - self.t0)
            self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.index >= 0 and not self.gen.done_index(self.index):
            self.gen.fail(f"connection lost during request {self.index}: {exc}")
        if not self.closed.done():
            self.closed.set_result(None)


class LoadGenerator:
    """Send ``total`` requests (or as many as fit in ``duration_s``) over ``connections`` keep-alive
    connections. ``make_request(i)`` builds request i; ``on_response(i, status, head, body)`` sees
    every answer; ``on_progress(done)`` is called after each one."""

    def __init__(
        self,
        host: str,
        port: int,
        make_request: Callable[[int], bytes],
        connections: int,
        total: int | None = None,
        duration_s: float | None = None,
        on_response: Callable[[int, int, bytes, bytes], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
        warmup: int = 0,
    ) -> None:
        if total is None and duration_s is None:
            raise ValueError("give total or duration_s")
        self.host, self.port = host, port
        self.make_request = make_request
        self.connections = connections
        self.total = total
        self.duration_s = duration_s
        self.on_response = on_response
        self.on_progress = on_progress
        self.warmup = warmup
        self.result = LoadResult()
        self._issued = 0
        self._answered: set[int] = set()
        self._deadline = float("inf")
        self._done = 0

    def next_index(self) -> int | None:
        if self.total is not None and self._issued >= self.total:
            return None
        if time.perf_counter() > self._deadline:
            return None
        i = self._issued
        self._issued += 1
        return i

    def done_index(self, i: int) -> bool:
        return i in self._answered

    def record(self, i: int, status: int, head: bytes, body: bytes, latency: float) -> None:
        self._answered.add(i)
        r = self.result
        self._done += 1
        if self._done == self.warmup and self.warmup:
            # Warm-up answers are not measured.
            r.latencies_s.clear()
            r.answered_at.clear()
            r.statuses.clear()
            r.started = time.perf_counter()
        else:
            r.latencies_s.append(latency)
            r.answered_at.append(time.perf_counter())
            r.statuses[status] = r.statuses.get(status, 0) + 1
        r.bytes_received += len(head) + len(body)
        if self.on_response is not None:
            self.on_response(i, status, head, body)
        if self.on_progress is not None:
            self.on_progress(self._done)

    def fail(self, message: str) -> None:
        self.result.errors.append(message)

    async def run(self) -> LoadResult:
        loop = asyncio.get_running_loop()
        self.result.started = time.perf_counter()
        if self.duration_s is not None:
            self._deadline = self.result.deadline = self.result.started + self.duration_s
        conns: list[_Conn] = []
        for _ in range(self.connections):
            _, c = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
            conns.append(c)
        self.result.opened = time.perf_counter()
        await asyncio.gather(*(c.closed for c in conns))
        self.result.ended = time.perf_counter()
        return self.result
