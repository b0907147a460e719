"""The fusion rule (Algorithm 1) and the topologies (Algorithms 2-4) as pure functions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.fusion.algorithm import apply_schedule, fuse, mixing_matrix, schedule_matrix
from shoal.fusion.topology import hypercube, hypercube_stages, random_pairs, ring, schedule


def test_fuse_hand_computed() -> None:
    a, b = fuse(np.array([1.0, 2.0]), np.array([3.0, -2.0]), 0.25)
    # A' = 0.75*1 + 0.25*3 = 1.5; B' = 0.75*3 + 0.25*1.5 = 2.625
    # A' = 0.75*2 + 0.25*-2 = 1.0; B' = 0.75*-2 + 0.25*1.0 = -1.25
    np.testing.assert_allclose(a, [1.5, 1.0])
    np.testing.assert_allclose(b, [2.625, -1.25])


def test_fuse_leaves_inputs_untouched() -> None:
    a0, b0 = np.array([1.0, 0.0]), np.array([3.0, 5.0])
    fuse(a0, b0, 0.5)
    np.testing.assert_array_equal(a0, [1.0, 0.0])
    np.testing.assert_array_equal(b0, [3.0, 5.0])


@pytest.mark.parametrize("f", [0.0, 1.0, 0.55])
def test_zero_rule_any_rate(f: float) -> None:
    # A zero -> both take B; B zero -> both take A's pre-fusion value; both zero -> both stay zero.
    a, b = fuse(np.array([0.0, 4.0, 0.0]), np.array([7.0, 0.0, 0.0]), f)
    np.testing.assert_array_equal(a, [7.0, 4.0, 0.0])
    np.testing.assert_array_equal(b, [7.0, 4.0, 0.0])


def test_rate_zero_and_one_on_nonzero_weights() -> None:
    a, b = fuse(np.array([2.0]), np.array([6.0]), 0.0)
    assert (a[0], b[0]) == (2.0, 6.0)  # F=0: no influence
    a, b = fuse(np.array([2.0]), np.array([6.0]), 1.0)
    assert (a[0], b[0]) == (6.0, 6.0)  # F=1: A takes B, then B takes the new A


def test_mean_not_preserved() -> None:
    a, b = fuse(np.array([1.0]), np.array([3.0]), 0.5)
    assert (a[0], b[0]) == (2.0, 2.5)
    assert (a[0] + b[0]) / 2 != 2.0  # the pair's mean moved from 2.0 to 2.25


@settings(max_examples=200, deadline=None)
@given(
    st.floats(-1e3, 1e3).filter(lambda x: abs(x) > 1e-6),
    st.floats(-1e3, 1e3).filter(lambda x: abs(x) > 1e-6),
    st.floats(0.0, 1.0),
)
def test_difference_shrinks_by_one_minus_f_squared(x: float, y: float, f: float) -> None:
    a, b = fuse(np.array([x]), np.array([y]), f)
    assert b[0] - a[0] == pytest.approx((1 - f) ** 2 * (y - x), rel=1e-9, abs=1e-9)


def test_fuse_works_on_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    a, b = fuse(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0]), 0.5)
    assert isinstance(a, torch.Tensor)
    assert a.tolist() == [2.0, 2.0] and b.tolist() == [2.0, 2.5]


def test_ring_order() -> None:
    assert ring(4) == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert ring(2) == [(0, 1), (1, 0)]
    assert ring(1) == []


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_hypercube_stage_pairs_every_peer_once(n: int) -> None:
    stages = hypercube_stages(n)
    assert len(stages) == n.bit_length() - 1
    for x, stage in enumerate(stages):
        peers = [p for pair in stage for p in pair]
        assert sorted(peers) == list(range(n))  # every peer exactly once
        assert all(b == a ^ (1 << x) and a < b for a, b in stage)


def test_hypercube_not_power_of_two() -> None:
    stages = hypercube_stages(10)
    assert len(stages) == 4
    for stage in stages:
        peers = [p for pair in stage for p in pair]
        assert len(peers) == len(set(peers))  # at most once per stage
        assert all(b < 10 for _, b in stage)
    # Connected: every peer reaches peer 0 through the edges used.
    edges = {frozenset(p) for p in hypercube(10)}
    seen, todo = {0}, [0]
    while todo:
        u = todo.pop()
        for e in edges:
            if u in e:
                (v,) = e - {u}
                if v not in seen:
                    seen.add(v)
                    todo.append(v)
    assert seen == set(range(10))


@pytest.mark.parametrize("n", [2, 7, 8, 10])
def test_random_pairs_reproducible_and_cover(n: int) -> None:
    s1 = random_pairs(n, seed=3, round_=5)
    assert s1 == random_pairs(n, seed=3, round_=5)
    assert any(random_pairs(n, seed=3, round_=r) != s1 for r in range(6, 12))
    assert all(a != b for a, b in s1)
    assert len(s1) == (n + 1) // 2
    firsts = [p for pair in s1[: n // 2] for p in pair]
    assert len(set(firsts)) == 2 * (n // 2)  # a perfect matching of the first 2*(n//2) peers
    assert {p for pair in s1 for p in pair} == set(range(n))  # the odd one out fuses too


def test_schedule_dispatch() -> None:
    assert schedule("ring", 3) == ring(3)
    assert schedule("none", 5) == []
    with pytest.raises(ValueError, match="unknown topology"):
        schedule("star", 3)


def test_mixing_matrix_of_one_fusion() -> None:
    m = mixing_matrix(3, (2, 0), 0.25)
    x = np.array([4.0, 5.0, 8.0])
    a, b = fuse(x[2:3], x[0:1], 0.25)
    np.testing.assert_allclose(m @ x, [b[0], 5.0, a[0]])


@pytest.mark.parametrize("topo", ["ring", "random", "hypercube"])
@pytest.mark.parametrize("n", [5, 8])
def test_schedule_equals_product_of_mixing_matrices(topo: str, n: int) -> None:
    rng = np.random.default_rng(0)
    f = 0.37
    peers = [[rng.normal(size=(3, 2)), rng.normal(size=4)] for _ in range(n)]
    sched = schedule(topo, n, seed=1, round_=2)
    fused = apply_schedule(peers, sched, f)
    m = schedule_matrix(n, sched, f)
    for layer in range(2):
        stacked = np.stack([p[layer] for p in peers])
        expect = np.tensordot(m, stacked, axes=1)
        np.testing.assert_allclose(np.stack([p[layer] for p in fused]), expect, rtol=1e-12, atol=1e-12)


def test_apply_schedule_rejects_self_pair() -> None:
    with pytest.raises(ValueError):
        apply_schedule([[np.ones(1)]], [(0, 0)], 0.5)
