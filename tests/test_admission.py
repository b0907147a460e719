"""Admission under overload, priorities and cancellation in the dispatcher, in memory with the clock
passed in: the queue in priority levels, the service time measured while requests wait, a request
refused at once when its answer is predicted after its deadline, and one whose client left taken out."""

from __future__ import annotations

import asyncio

import pytest
from test_dispatch import FakeWorker as Worker

from shoal.gateway.dispatch import Dispatcher
from shoal.gateway.policy import Patience, shed_retry_after_ms
from shoal.gateway.pool import ModelTable, Pending, Priorities, RequestFailed
from shoal.gateway.quotas import Quota, Quotas, parse_quota
from shoal.gateway.request_queue import RequestQueue
from shoal.protocol.interface import ModelInterface


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def setup(workers=(), levels=2, default=2, max_queue=100):
    table = ModelTable(max_queue=max_queue, priorities=Priorities(levels, default))
    pool = table.pool_for_worker(ModelInterface("m", "1", (), (), 0, None))
    d = Dispatcher(table)
    for w in workers:
        d.worker_joined(pool, w, 0.0)
    return d, pool


def req(loop, pool, i: int, deadline: float = 30.0, priority: int = 0) -> Pending:
    p = Pending(i, [i], loop.create_future(), deadline=deadline)
    p.level = pool.level(priority)
    return p


class Item:
    def __init__(self, name: str, level: int) -> None:
        self.name, self.level = name, level


def test_the_queue_serves_levels_in_order_and_each_level_oldest_first():
    q = RequestQueue(3)
    for name, level in [("a", 2), ("b", 0), ("c", 1), ("d", 0), ("e", 2)]:
        q.append(Item(name, level))
    q.appendleft(Item("again", 1))  # sent again: the head of its level
    assert len(q) == 6 and q.head().name == "b"
    assert [x.name for x in q] == ["b", "d", "again", "c", "a", "e"]
    assert q.ahead_of(0) == 2 and q.ahead_of(1) == 4 and q.ahead_of(2) == 6
    assert q.pop_lower(0).name == "e" and q.pop_lower(2) is None
    q.keep(lambda x: x.name != "d")
    assert [q.popleft().name for _ in range(len(q))] == ["b", "again", "c", "a"]
    assert not q and q.pop_lower(0) is None
    with pytest.raises(IndexError):
        q.head()


def test_priorities_map_as_tritons_do(loop):
    _, pool = setup(levels=3, default=2)
    assert [pool.level(p) for p in (0, 1, 2, 3, 9)] == [1, 0, 1, 2, 2]


def test_a_high_priority_request_overtakes_the_queue(loop):
    w = Worker("w", 1)
    d, pool = setup([w])
    for i in range(1, 4):
        d.submit(pool, req(loop, pool, i), 0.0)  # 1 sent, 2 and 3 queued at the default level
    d.submit(pool, req(loop, pool, 9, priority=1), 0.0)
    d.on_result(w, 1, "r", None, 0, 0.1)
    assert w.sent == [1, 9]


def test_a_full_queue_gives_its_newest_low_place_to_a_higher_priority(loop):
    w = Worker("w", 1)
    d, pool = setup([w], max_queue=2)
    low = [req(loop, pool, i) for i in range(1, 4)]
    for p in low:
        d.submit(pool, p, 0.0)
    with pytest.raises(RequestFailed, match="saturated"):  # full to its own level: refused
        d.submit(pool, req(loop, pool, 4), 0.0)
    d.submit(pool, req(loop, pool, 5, priority=1), 0.0)
    assert low[2].future.exception().status == 503  # the newest low one gave its place
    assert [p.id for p in pool.queue] == [5, 2]


def test_service_time_is_measured_between_answers_while_requests_wait(loop):
    w = Worker("w", 32)
    d, pool = setup([w])
    n, t, answered = 32, 0.0, 0
    for i in range(1, 33):  # a batch ahead: the worker holds 32, the queue 32 from the start
        d.submit(pool, req(loop, pool, i), t)
    for _burst in range(8):  # a batch of 32 answered every 20 ms; as many arrive: the queue stays
        for _ in range(32):
            n += 1
            d.submit(pool, req(loop, pool, n), t)
        t += 0.02
        batch = w.sent[answered : answered + 32]
        answered += 32
        for i in batch:
            d.on_result(w, i, "r", 20.0, 32, t)
    assert pool.per_request_s == pytest.approx(0.02 / 32, rel=0.05)


def test_a_request_whose_answer_would_come_after_its_deadline_is_refused_at_once(loop):
    w = Worker("w", 1)
    d, pool = setup([w])
    pool.per_request_s = 0.1  # measured: one answer every 100 ms
    d.submit(pool, req(loop, pool, 1, deadline=1.0), 0.0)  # sent at once: no prediction needed
    for i in range(2, 7):
        d.submit(pool, req(loop, pool, i, deadline=1.0), 0.0)  # waits 0.2 .. 0.6 s: admitted
    with pytest.raises(RequestFailed) as e:
        d.submit(pool, req(loop, pool, 7, deadline=0.5), 0.0)  # 6 before it: 0.7 s > 0.8 x 0.5 s
    assert e.value.status == 503 and e.value.retry_after_ms == 300 and e.value.retry_after == 1
    assert "overloaded" in str(e.value) and pool.shed == 1 and len(pool.queue) == 5
    d.submit(pool, req(loop, pool, 8, deadline=0.5, priority=1), 0.0)  # high: only the one in flight
    assert pool.queue.head().id == 8


def test_before_the_pool_is_measured_the_models_own_time_predicts(loop):
    w = Worker("w", 1)
    d, pool = setup([w])
    assert pool.predicted_wait_s(1) is None  # nothing known: admitted
    pool.service_ms = 100.0
    d.submit(pool, req(loop, pool, 1, deadline=10.0), 0.0)
    assert pool.predicted_wait_s(1) == pytest.approx(0.2)  # the one in flight, then it


def test_a_cancelled_request_leaves_the_queue_and_never_runs(loop):
    w = Worker("w", 1)
    d, pool = setup([w])
    ps = [req(loop, pool, i) for i in range(1, 4)]
    for p in ps:
        d.submit(pool, p, 0.0)
    ps[1].future.cancel()
    d.cancel(ps[1], 0.0)
    assert [p.id for p in pool.queue] == [3] and pool.cancelled == 1
    ps[0].future.cancel()  # held by the worker: it is told, and drops it unless it is running
    d.cancel(ps[0], 0.0)
    assert w.cancels == [1]
    d.on_result(w, 1, "r", 5.0, 1, 0.1)  # it was running: its answer is dropped
    assert w.sent == [1, 3] and pool.unread_ms == pytest.approx(5.0)


def test_retry_after_in_milliseconds():
    assert shed_retry_after_ms(0.7, 0.5) == 200
    assert shed_retry_after_ms(0.5, 0.5) == 1


def test_quotas_per_role_and_per_account():
    rules = dict(parse_quota(s) for s in ["device=2/3", "device:cam-7=0.5", "operator=100"])
    assert rules["device"] == Quota(2.0, 3.0) and rules["device:cam-7"] == Quota(0.5, 1.0)
    q = Quotas(rules)
    assert [q.check("device", "device:cam-1", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert q.check("device", "device:cam-1", 0.0) == pytest.approx(0.5)  # then 2 a second
    assert q.check("device", "device:cam-2", 0.0) == 0.0  # each device its own bucket
    assert q.check("device", "device:cam-1", 0.5) == 0.0
    assert q.check("device", "device:cam-7", 0.0) == 0.0  # its own quota: one at once ...
    assert q.check("device", "device:cam-7", 0.0) == pytest.approx(2.0)  # ... then one every 2 s
    assert q.check("scrape", "key:00", 0.0) == 0.0  # no rule: no limit


@pytest.mark.parametrize("spec", ["device", "=3", "device=0", "device=x", "device=2/0.5", "device=inf"])
def test_a_malformed_quota_says_what_is_wrong(spec):
    with pytest.raises(ValueError, match="quota"):
        parse_quota(spec)


def test_the_clients_patience_is_learned_from_those_that_leave():
    p = Patience()
    for i in range(7):
        p.left(0.3 + i * 0.01, float(i))
    assert p.seconds(7.0) is None  # too few to tell
    p.left(0.5, 7.0)
    assert p.seconds(7.0) == pytest.approx(0.3)  # the 10th percentile of what they waited
    assert p.seconds(17.5) is None  # nobody left for 10 s: forgotten


def test_requests_that_do_not_say_their_deadline_are_admitted_against_the_clients_patience(loop):
    w = Worker("w", 1)
    d, pool = setup([w])
    pool.per_request_s = 0.1
    for _ in range(8):  # clients that gave up after about 300 ms
        pool.patience.left(0.3, 0.0)
    d.submit(pool, req(loop, pool, 1, deadline=30.0), 0.0)  # sent at once
    d.submit(pool, req(loop, pool, 2, deadline=30.0), 0.0)  # 0.2 s <= 0.8 x 0.3 s: queued
    with pytest.raises(RequestFailed, match="its clients wait before they give up"):
        d.submit(pool, req(loop, pool, 3, deadline=30.0), 0.0)  # 0.3 s: they would be gone
    told = req(loop, pool, 4, deadline=30.0)
    told.told = True  # a client that said its deadline is held to it, not to the others' patience
    d.submit(pool, told, 0.0)
    assert [p.id for p in pool.queue] == [2, 4]
