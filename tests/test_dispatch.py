"""The dispatcher in memory: every pending request's life, with the clock passed in."""

from __future__ import annotations

import asyncio

import pytest

from shoal.gateway.dispatch import Dispatcher
from shoal.gateway.pool import ModelTable, Pending, RequestFailed
from shoal.protocol.interface import ModelInterface


class FakeWorker:
    """A worker as the dispatcher sees it: it records the requests it is given."""

    def __init__(self, wid: str, capacity: int = 2) -> None:
        self.worker_id = wid
        self.in_flight = 0
        self.capacity = capacity
        self.latency_ewma_ms = 0.0
        self.accepting = True
        self.max_frame_size = 1 << 26
        self.sent: list[int] = []
        self.cancels: list[int] = []

    def send_request(self, p: Pending) -> None:
        self.sent.append(p.id)

    def cancel(self, rid: int) -> None:
        self.cancels.append(rid)


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def setup(loop, workers=(), max_queue=4, max_attempts=3, wakeable=False):
    table = ModelTable(max_queue=max_queue, max_attempts=max_attempts)
    pool = table.pool_for_worker(ModelInterface("m", "1", (), (), 0, None))
    pool.wakeable = wakeable
    d = Dispatcher(table, unserved_wait_s=3.0)
    for w in workers:
        d.worker_joined(pool, w, 0.0)
    return d, pool


def req(loop, i: int, deadline: float = 30.0) -> Pending:
    return Pending(i, [i], loop.create_future(), deadline=deadline)


def test_least_loaded_first_then_the_queue_then_503(loop):
    a, b = FakeWorker("a", 1), FakeWorker("b", 2)
    d, pool = setup(loop, [a, b], max_queue=2)
    for i in range(1, 4):
        d.submit(pool, req(loop, i), 0.0)
    assert (a.sent, b.sent) == ([1], [2, 3])  # ties go to the earlier worker; never beyond capacity
    d.submit(pool, req(loop, 4), 0.0)
    d.submit(pool, req(loop, 5), 0.0)
    assert [p.id for p in pool.queue] == [4, 5]
    with pytest.raises(RequestFailed) as e:
        d.submit(pool, req(loop, 6), 0.0)
    assert e.value.status == 503 and e.value.retry_after is not None


def test_an_answer_frees_a_slot_and_the_queue_moves(loop):
    a = FakeWorker("a", 1)
    d, pool = setup(loop, [a])
    p1, p2 = req(loop, 1), req(loop, 2)
    d.submit(pool, p1, 0.0)
    d.submit(pool, p2, 0.0)
    assert a.sent == [1] and a.in_flight == 1
    assert d.on_result(a, 1, "out-1", 2.0, 1, 0.01) is p1
    assert p1.future.result() == "out-1" and a.sent == [1, 2] and a.in_flight == 1
    assert pool.busy_ms == pytest.approx(2.0)


def test_a_worker_that_leaves_hands_back_what_it_held_oldest_first(loop):
    a, b = FakeWorker("a", 3), FakeWorker("b", 1)
    d, pool = setup(loop, [a])
    for i in range(1, 4):
        d.submit(pool, req(loop, i), 0.0)
    d.worker_joined(pool, b, 0.1)
    assert d.worker_left(pool, a, "killed", 0.2) == 3
    assert b.sent == [1] and [p.id for p in pool.queue] == [2, 3]  # in order, the oldest first
    assert a.in_flight == 0 and a not in pool.workers
    assert d.on_result(a, 2, "late", 1.0, 1, 0.3) is None  # a result from the dead: dropped


def test_a_silent_worker_hands_back_what_it_held_and_takes_requests_again_when_it_speaks(loop):
    a, b = FakeWorker("a", 3), FakeWorker("b", 1)
    d, pool = setup(loop, [a, b])
    for i in range(1, 4):
        d.submit(pool, req(loop, i), 0.0)
    held_by_a = [i for i in a.sent]
    assert d.worker_silent(pool, a, "fell silent", 0.2) == len(held_by_a)
    assert a in pool.workers and not a.accepting and a.in_flight == 0  # kept, but sent nothing
    assert d.on_result(a, held_by_a[0], "late", 1.0, 1, 0.3) is None  # no longer its: dropped
    d.submit(pool, req(loop, 9), 0.4)
    assert 9 not in a.sent
    d.worker_heard(pool, a, 0.5)
    assert a.accepting and a.sent[-1] in held_by_a + [9]  # the queue moves to it again


def test_a_request_turned_away_goes_elsewhere_until_its_attempts_are_spent(loop):
    a = FakeWorker("a", 1)
    d, pool = setup(loop, [a], max_attempts=2)
    p = req(loop, 1)
    d.submit(pool, p, 0.0)
    d.on_refused(a, 1, "worker full", 0.1)
    assert a.sent == [1, 1] and p.attempts == 2  # sent again
    d.on_refused(a, 1, "worker full", 0.2)
    assert isinstance(p.future.exception(), RequestFailed) and p.future.exception().status == 502


def test_deadlines_queued_and_in_flight(loop):
    a = FakeWorker("a", 1)
    d, pool = setup(loop, [a])
    running, waiting = req(loop, 1, deadline=1.0), req(loop, 2, deadline=1.0)
    d.submit(pool, running, 0.0)
    d.submit(pool, waiting, 0.0)
    assert d.expire(0.5) == 0
    assert d.expire(1.5) == 2
    assert running.future.exception().status == 504 and waiting.future.exception().status == 504
    # The timed-out request keeps its worker's slot until the worker answers, then the answer is dropped.
    assert a.in_flight == 1 and not pool.queue
    d.on_result(a, 1, "too late", 1.0, 1, 2.0)
    assert a.in_flight == 0


def test_requests_for_a_model_with_no_worker_fail_after_a_while_unless_it_can_be_woken(loop):
    d, pool = setup(loop, [])
    p = req(loop, 1)
    d.submit(pool, p, 0.0)
    assert d.expire(2.0) == 0
    pool.no_worker_since = 0.0
    assert d.expire(3.5) == 1 and p.future.exception().status == 503
    d2, sleepy = setup(loop, [], wakeable=True)
    woke = []
    sleepy.on_wait = lambda: woke.append(True)
    q = req(loop, 2, deadline=30.0)
    d2.submit(sleepy, q, 0.0)
    sleepy.no_worker_since = 0.0
    assert woke == [True] and d2.expire(10.0) == 0 and not q.future.done()  # waits for the wake
    w = FakeWorker("w")
    d2.worker_joined(sleepy, w, 11.0)
    assert w.sent == [2]


def test_a_draining_worker_gets_nothing_new(loop):
    a, b = FakeWorker("a", 4), FakeWorker("b", 4)
    d, pool = setup(loop, [a, b])
    d.worker_stopped_taking(pool, a, 0.0)
    for i in range(1, 4):
        d.submit(pool, req(loop, i), 0.1)
    assert a.sent == [] and b.sent == [1, 2, 3]
