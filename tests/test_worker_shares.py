"""How a worker divides its capacity between the gateways it serves (``shoal/worker/shares.py``)."""

from hypothesis import given
from hypothesis import strategies as st

from shoal.worker.shares import capacity_shares, demand


def test_one_gateway_gets_it_all():
    assert capacity_shares(64, [0.0]) == [64]
    assert capacity_shares(64, []) == []


def test_equal_split_without_demand():
    assert capacity_shares(64, [0.0, 0.0]) == [32, 32]
    assert sorted(capacity_shares(10, [0.0, 0.0, 0.0])) == [3, 3, 4]


def test_a_busy_gateway_gets_most_but_the_idle_one_keeps_a_floor():
    busy, idle = capacity_shares(64, [100.0, 0.0])
    assert busy + idle == 64
    assert idle == 16  # half an equal split
    assert busy == 48


def test_more_gateways_than_capacity_each_get_one():
    assert capacity_shares(2, [5.0, 1.0, 0.0]) == [1, 1, 1]


def test_demand_is_a_moving_average():
    d = 0.0
    for _ in range(20):
        d = demand(d, 100)
    assert 99 < d <= 100
    assert demand(100.0, 0) == 50.0


@given(st.integers(1, 10_000), st.lists(st.floats(0, 1e6), min_size=1, max_size=16))
def test_shares_add_up_and_none_is_empty(capacity, demands):
    shares = capacity_shares(capacity, demands)
    assert len(shares) == len(demands)
    assert all(s >= 1 for s in shares)
    if capacity >= len(demands):
        assert sum(shares) == capacity
