"""The one owner of every pending request, from arrival to answer: queueing, the choice of worker,
in-flight counts, deadlines (queued and in flight alike), sending again when a worker dies or turns a
request away, and dropping results that come too late. No sockets and no clock: every method takes
``now``; workers are anything with ``send_request(p)`` (the worker link's adapter), and the
choice among them is ``policy.pick_worker``.

A request's life: ``submit`` sends it to the least-loaded worker with room, or queues it (503 when
the queue is full). ``on_result`` / ``on_failed`` answer it; ``on_refused`` (the worker was full or
draining) and ``worker_left`` put it back at the head of its queue, to be sent elsewhere, at most
``max_attempts`` times. ``expire`` fails what is past its deadline, queued or in flight; a request
timed out in flight keeps its place on its worker until the worker answers (so no worker is sent more
than it said it can hold), and the late answer is dropped. ``close`` fails everything still waiting
when the gateway stops, and refuses what comes after.

It is also the only writer of the pools' and workers' state that others change: a worker's
``accepting`` (joined, draining, gone), a model unloaded, loaded, woken or given up by the autoscaler
(``unload``, ``load``, ``wake``, ``give_up``, ``drain_worker``), and the admission queues that bound
how many requests a pipeline step holds at once (``admission``), whose waiters expire with the rest.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from shoal.gateway.policy import ewma, pick_worker, retry_after_s, shed_retry_after_ms
from shoal.gateway.pool import ModelPool, ModelTable, Pending, RequestFailed, WorkerHandle

# A request that must queue is admitted when its answer is predicted within this share of the time
# left before its deadline: the rest is the prediction's margin (a worker slower for a while, the
# answer's way back), so that admitted requests are answered in time.
ADMIT_SHARE = 0.8


@dataclass(eq=False)
class Admission:
    """At most ``limit`` requests at once (one step of a pipeline); the others wait, in order, until a
    place frees or their deadline passes. Its state is the dispatcher's: only it admits, releases and
    expires (``Dispatcher.admit``, ``release``, ``expire``)."""

    limit: int
    active: int = 0
    waiting: deque[tuple[float, asyncio.Future]] = field(default_factory=deque)


class Dispatcher:
    def __init__(self, table: ModelTable, unserved_wait_s: float = 3.0) -> None:
        self.table = table
        self.unserved_wait_s = unserved_wait_s
        self.in_flight: dict[int, Pending] = {}  # requests sent to a worker, by the gateway's id
        self.on_retry: Any = None  # called with the pool when a request is sent again (metrics)
        self.closed: str | None = None  # why nothing is taken any more (the gateway stops)
        self.admissions: list[Admission] = []

    # --------------------------------------------------------------------------------- arrivals

    def submit(self, pool: ModelPool, p: Pending, now: float) -> None:
        """Send now to the least-loaded worker with room, else queue; ``RequestFailed`` (503) when the
        queue is full, or when the answer is predicted after the request's deadline (it is refused
        at once, with the time to wait before trying again, rather than queued to time out)."""
        if self.closed is not None:
            raise RequestFailed(self.closed, 503)
        p.t_enqueued = now
        p.pool = pool
        pool.arrivals += 1
        if not pool.queue:
            i = pick_worker(pool.workers)
            if i is not None:
                self._send(pool.workers[i], p, now)
                return
        if not pool.workers and pool.on_wait is not None:
            pool.on_wait()  # a sleeping model: tell whoever can wake it, now
        self.refuse_if_late(pool, p.level, p.deadline, p.told, now)
        if len(pool.queue) >= pool.max_queue:
            bumped = pool.queue.pop_lower(p.level)  # the newest of a lower level gives its place
            if bumped is None:
                raise _saturated(pool, f"{len(pool.queue)} requests already queued")
            if not bumped.future.done():
                bumped.future.set_exception(
                    _saturated(pool, "the queue's place went to a request of a higher priority")
                )
        pool.queue.append(p)

    @staticmethod
    def refuse_if_late(pool: ModelPool, level: int, deadline: float, told: bool, now: float) -> None:
        """``RequestFailed`` (503, with when to try again) for a request of ``level`` whose answer is
        predicted after its deadline, or, when its client did not say its deadline (``told``), after
        the time the model's clients wait before they give up. (Before its body is read, the HTTP
        front asks this at level 0, the most favourable: a request refused then would be whatever
        priority its body names.)"""
        if not pool.queue and any(w.accepting and w.in_flight < w.capacity for w in pool.workers):
            return  # a worker has room: it is sent at once
        wait = pool.predicted_wait_s(level)
        if wait is None:
            return
        left = max(0.0, deadline - now)
        what = "the request's deadline"
        if not told and (patience := pool.patience.seconds(now)) is not None and patience < left:
            left, what = patience, "the time its clients wait before they give up"
        if wait <= ADMIT_SHARE * left:
            return
        pool.shed += 1
        ms = shed_retry_after_ms(wait, ADMIT_SHARE * left)
        raise RequestFailed(
            f"model '{pool.spec.name}' version {pool.spec.version} is overloaded: its answer is "
            f"expected in {wait * 1e3:.0f} ms, after {what} ({left * 1e3:.0f} ms)",
            503,
            -(-ms // 1000),
            ms,
        )

    def _send(self, w: WorkerHandle, p: Pending, now: float) -> None:
        p.worker = w
        p.attempts += 1
        p.t_sent = now
        w.in_flight += 1
        self.in_flight[p.id] = p
        w.send_request(p)

    def dispatch(self, pool: ModelPool, now: float) -> None:
        """Move queued requests to workers while any has room."""
        q = pool.queue
        while q:
            p = q.head()
            if p.future.done():  # timed out or cancelled while waiting
                q.popleft()
                continue
            i = pick_worker(pool.workers)
            if i is None:
                return
            q.popleft()
            self._send(pool.workers[i], p, now)

    # ---------------------------------------------------------------------------- answers

    def _take(self, w: WorkerHandle, rid: int) -> Pending | None:
        """The request ``w`` answers, out of the in-flight table; None for one it does not hold (an
        id it was never sent, or one sent elsewhere since)."""
        p = self.in_flight.get(rid)
        if p is None or p.worker is not w:
            return None
        del self.in_flight[rid]
        w.in_flight -= 1
        return p

    def on_result(
        self, w: WorkerHandle, rid: int, result: Any, compute_ms: float | None, batch_rows: int, now: float
    ) -> Pending | None:
        """A worker answered: the request gets its result (unless its deadline passed, when the late
        answer is dropped). Returns the request, or None when there was none to answer."""
        p = self._take(w, rid)
        if p is None:
            return None
        pool: ModelPool = p.pool
        w.latency_ewma_ms = ewma(
            w.latency_ewma_ms, compute_ms if compute_ms is not None else (now - p.t_sent) * 1e3
        )
        if compute_ms is not None and batch_rows > 0:
            share = compute_ms * p.rows / batch_rows  # this request's part of its batch's model time
            pool.busy_ms += share
            pool.service_ms = ewma(pool.service_ms, share)
            if p.future.done():  # its client left, or its deadline passed: nobody reads this answer
                pool.unread_ms += share
        if not p.future.done():
            p.future.set_result(result)
        pool.answered(now)
        self.dispatch(pool, now)
        return p

    def on_failed(self, w: WorkerHandle, rid: int, error: RequestFailed, now: float) -> Pending | None:
        """The worker could not compute it (bad input, model error): that is the request's answer."""
        p = self._take(w, rid)
        if p is None:
            return None
        if not p.future.done():
            p.future.set_exception(error)
        self.dispatch(p.pool, now)
        return p

    def on_refused(self, w: WorkerHandle, rid: int, reason: str, now: float) -> None:
        """The worker turned it away (full, draining, out of service): another worker may take it."""
        p = self._take(w, rid)
        if p is not None:
            self._again(p, reason)
            self.dispatch(p.pool, now)

    def cancel(self, p: Pending, now: float) -> None:
        """Its client has gone (disconnected, or cancelled its call): a request still queued is taken
        out and never runs; one a worker holds runs, and its answer is dropped."""
        pool: ModelPool = p.pool
        pool.cancelled += 1
        pool.patience.left(now - p.t_enqueued, now)
        if self.in_flight.get(p.id) is p:
            p.worker.cancel(p.id)  # the worker drops it unless it is running
        else:
            pool.queue.remove(p)

    def _again(self, p: Pending, reason: str) -> None:
        """Back at the head of its queue, unless it is answered already or has had its attempts."""
        if p.future.done():
            return
        pool: ModelPool = p.pool
        if p.attempts >= pool.max_attempts:
            p.future.set_exception(
                RequestFailed(
                    f"request failed on {p.attempts} workers of '{pool.spec.name}' (last: {reason})", 502
                )
            )
            return
        if self.on_retry is not None:
            self.on_retry(pool)
        pool.queue.appendleft(p)

    # ------------------------------------------------------------------------------ workers

    def worker_joined(self, pool: ModelPool, w: WorkerHandle, now: float) -> None:
        w.accepting = True
        pool.workers.append(w)
        pool.no_worker_since = None
        self.dispatch(pool, now)

    def worker_capacity(self, pool: ModelPool, w: WorkerHandle, capacity: int, now: float) -> None:
        """A worker linked to several gateways changed this gateway's share of it."""
        grew = capacity > w.capacity
        w.capacity = capacity
        if grew:
            self.dispatch(pool, now)

    def worker_stopped_taking(self, pool: ModelPool, w: WorkerHandle, now: float) -> None:
        """It drains: nothing new goes to it; what it holds it still answers."""
        w.accepting = False
        self.dispatch(pool, now)

    def drain_worker(self, pool: ModelPool, w: WorkerHandle, now: float) -> None:
        """Ask a worker to drain (the autoscaler's scale-in): it takes nothing new from now on."""
        if w.accepting:
            self.worker_stopped_taking(pool, w, now)
            w.drain()

    # ------------------------------------------------------------------ models, for the autoscaler

    def unload(self, pool: ModelPool, now: float) -> None:
        """An operator unloaded it: requests for it are refused (404), those waiting fail now."""
        pool.unloaded = True
        self._fail_queue(
            pool, RequestFailed(f"model '{pool.spec.name}' version {pool.spec.version} is unloaded", 404)
        )

    def load(self, pool: ModelPool) -> None:
        """Served again (an operator's load): neither unloaded nor given up."""
        pool.unloaded = False
        pool.unavailable = None

    def wake(self, pool: ModelPool) -> None:
        """Counted as a request: an engine that sleeps the model at zero starts a worker for it."""
        pool.arrivals += 1

    def give_up(self, pool: ModelPool, reason: str) -> None:
        """Its workers cannot start: requests get 503 with the reason at once, those waiting now."""
        pool.unavailable = reason
        if not pool.ready:
            self._fail_queue(
                pool,
                RequestFailed(
                    f"model '{pool.spec.name}' version {pool.spec.version} is unavailable: {reason}", 503
                ),
            )

    def _fail_queue(self, pool: ModelPool, error: RequestFailed) -> None:
        for p in pool.queue:
            if not p.future.done():
                p.future.set_exception(error)
        pool.queue.clear()

    # ----------------------------------------------------------------------------- admission

    def admission(self, limit: int) -> Admission:
        a = Admission(limit)
        self.admissions.append(a)
        return a

    async def admit(self, a: Admission, deadline: float) -> None:
        """Wait for a place in ``a``: at once when there is one, else in order; ``RequestFailed``
        (504) when ``deadline`` passes first, 503 when the gateway closes."""
        if self.closed is not None:
            raise RequestFailed(self.closed, 503)
        if a.active < a.limit and not a.waiting:
            a.active += 1
            return
        fut = asyncio.get_running_loop().create_future()
        a.waiting.append((deadline, fut))
        await fut  # the place is handed over by ``release``, already counted

    def release(self, a: Admission) -> None:
        """A request left ``a``: its place goes to the next one still waiting."""
        while a.waiting:
            _, fut = a.waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        a.active -= 1

    # ------------------------------------------------------------------------------ shutdown

    def close(self, now: float, reason: str) -> int:
        """The gateway stops: every request still queued, in flight or waiting for admission fails
        (503, ``reason``), and nothing new is taken. Returns how many failed."""
        self.closed = reason
        error = RequestFailed(reason, 503)
        n = 0
        for p in self.in_flight.values():
            if not p.future.done():
                p.future.set_exception(error)
                n += 1
        for pool in self.table.pools():
            n += sum(1 for p in pool.queue if not p.future.done())
            self._fail_queue(pool, error)
        for a in self.admissions:
            for _, fut in a.waiting:
                if not fut.done():
                    fut.set_exception(error)
                    n += 1
            a.waiting.clear()
        return n

    @property
    def pending(self) -> int:
        """Requests queued or in flight (what a drain waits for)."""
        return len(self.in_flight) + sum(len(p.queue) for p in self.table.pools())

    def worker_left(self, pool: ModelPool, w: WorkerHandle, reason: str, now: float) -> int:
        """It is gone (closed, dropped, silent): what it held goes to other workers, oldest first.
        Returns how many requests it held."""
        if w in pool.workers:
            pool.workers.remove(w)
        if not pool.workers:
            pool.no_worker_since = now
        return self._take_back(pool, w, reason, now)

    def worker_silent(self, pool: ModelPool, w: WorkerHandle, reason: str, now: float) -> int:
        """It has fallen silent (its machine may be cut off, its socket never closing): nothing new
        goes to it, and what it held goes to other workers now, oldest first (a late answer from it
        is dropped: the request is no longer its). ``worker_heard`` takes it back if it speaks."""
        return self._take_back(pool, w, reason, now)

    def worker_heard(self, pool: ModelPool, w: WorkerHandle, now: float) -> None:
        """A worker that had fallen silent spoke again: it takes requests again."""
        w.accepting = True
        self.dispatch(pool, now)

    def _take_back(self, pool: ModelPool, w: WorkerHandle, reason: str, now: float) -> int:
        held = sorted((p for p in self.in_flight.values() if p.worker is w), key=lambda p: p.id)
        for p in held:
            del self.in_flight[p.id]
        w.in_flight = 0
        w.accepting = False
        for p in reversed(held):  # the oldest ends up at the head of the queue
            self._again(p, reason)
        self.dispatch(pool, now)
        return len(held)

    # ---------------------------------------------------------------------------- deadlines

    def expire(self, now: float) -> int:
        """Fail requests past their deadline, queued or in flight, and queued ones when their model has
        had no live worker for ``unserved_wait_s`` (unless an engine can start one). Returns how many."""
        n = 0
        for p in self.in_flight.values():
            if not p.future.done() and now > p.deadline:
                w = p.worker
                p.future.set_exception(
                    RequestFailed(
                        f"request timed out on worker {w.worker_id} after {now - p.t_enqueued:.0f} s", 504
                    )
                )
                n += 1
        for pool in self.table.pools():
            n += self._expire_queue(pool, now)
        for a in self.admissions:
            n += self._expire_admission(a, now)
        return n

    @staticmethod
    def _expire_admission(a: Admission, now: float) -> int:
        if not a.waiting:
            return 0
        n = 0
        keep: deque[tuple[float, asyncio.Future]] = deque()
        for deadline, fut in a.waiting:
            if fut.done():
                continue
            if now > deadline:
                fut.set_exception(RequestFailed("request timed out waiting for its pipeline step", 504))
                n += 1
            else:
                keep.append((deadline, fut))
        a.waiting = keep
        return n

    def _expire_queue(self, pool: ModelPool, now: float) -> int:
        if not pool.queue:
            return 0
        orphaned = (
            not pool.wakeable
            and pool.no_worker_since is not None
            and now - pool.no_worker_since > self.unserved_wait_s
        )
        n = 0
        for p in pool.queue:
            if p.future.done():
                continue
            if now > p.deadline:
                p.future.set_exception(RequestFailed("request timed out waiting for a worker", 504))
                n += 1
            elif orphaned:
                p.future.set_exception(
                    RequestFailed(
                        f"model '{pool.spec.name}' version {pool.spec.version} has no live worker", 503, 1
                    )
                )
                n += 1
        pool.queue.keep(_waiting)
        return n


def _waiting(p: Pending) -> bool:
    return not p.future.done()


def _saturated(pool: ModelPool, why: str) -> RequestFailed:
    return RequestFailed(
        f"model '{pool.spec.name}' version {pool.spec.version} is saturated: {why}",
        503,
        retry_after_s(len(pool.queue), pool.capacity, pool.latency_ms()),
    )
