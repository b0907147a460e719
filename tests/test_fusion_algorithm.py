"""The fusion rule (Algorithm 1) and the topologies (Algorithms 2-4) as pure functions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.fusion.algorithm import apply_schedule, fuse, influence, mixing_matrix, schedule_matrix
from shoal.fusion.strategy import Interval, PeerFusion
from shoal.fusion.topology import hypercube, hypercube_stages, parallel_stages, random_pairs, ring, schedule


def test_fuse_hand_computed() -> None:
    a, b = fuse(np.array([1.0, 2.0]), np.array([3.0, -2.0]), 0.25)
    # A' = 0.75*1 + 0.25*3 = 1.5; B' = 0.75*3 + 0.25*1.5 = 2.625
    # A' = 0.75*2 + 0.25*-2 = 1.0; B' = 0.75*-2 + 0.25*1.0 = -1.25
    np.testing.assert_allclose(a, [1.5, 1.0])
    np.testing.assert_allclose(b, [2.625, -1.25])


def test_fuse_simultaneous_hand_computed() -> None:
    a, b = fuse(np.array([1.0, 2.0]), np.array([3.0, -2.0]), 0.25, "simultaneous")
    # A' = 0.75*1 + 0.25*3 = 1.5; B' = 0.75*3 + 0.25*1 = 2.5 (the old A): the pair's mean stays 2
    # A' = 0.75*2 + 0.25*-2 = 1.0; B' = 0.75*-2 + 0.25*2 = -1.0: the mean stays 0
    np.testing.assert_allclose(a, [1.5, 1.0])
    np.testing.assert_allclose(b, [2.5, -1.0])


def test_fuse_rejects_unknown_update() -> None:
    with pytest.raises(ValueError, match="sequential, simultaneous"):
        fuse(np.ones(1), np.ones(1), 0.5, "both")


def test_fuse_leaves_inputs_untouched() -> None:
    a0, b0 = np.array([1.0, 0.0]), np.array([3.0, 5.0])
    fuse(a0, b0, 0.5)
    np.testing.assert_array_equal(a0, [1.0, 0.0])
    np.testing.assert_array_equal(b0, [3.0, 5.0])


@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
@pytest.mark.parametrize("f", [0.0, 1.0, 0.55])
def test_zero_rule_any_rate(f: float, update: str) -> None:
    # A zero -> both take B; B zero -> both take A's pre-fusion value; both zero -> both stay zero.
    a, b = fuse(np.array([0.0, 4.0, 0.0]), np.array([7.0, 0.0, 0.0]), f, update)
    np.testing.assert_array_equal(a, [7.0, 4.0, 0.0])
    np.testing.assert_array_equal(b, [7.0, 4.0, 0.0])


def test_rate_zero_and_one_on_nonzero_weights() -> None:
    a, b = fuse(np.array([2.0]), np.array([6.0]), 0.0)
    assert (a[0], b[0]) == (2.0, 6.0)  # F=0: no influence
    a, b = fuse(np.array([2.0]), np.array([6.0]), 1.0)
    assert (a[0], b[0]) == (6.0, 6.0)  # F=1: A takes B, then B takes the new A


def test_mean_not_preserved_as_printed_and_preserved_simultaneous() -> None:
    a, b = fuse(np.array([1.0]), np.array([3.0]), 0.5)
    assert (a[0], b[0]) == (2.0, 2.5)  # the pair's mean moved from 2.0 to 2.25
    a, b = fuse(np.array([1.0]), np.array([3.0]), 0.5, "simultaneous")
    assert (a[0], b[0]) == (2.0, 2.0)
    a, b = fuse(np.array([1.0]), np.array([3.0]), 0.2, "simultaneous")
    assert (a[0], b[0]) == pytest.approx((1.4, 2.6))  # difference shrinks by |1-2F| = 0.6


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


def test_hypercube_as_printed_fuses_each_edge_twice() -> None:
    # Algorithm 4's inner loop: every s fuses (as A) with s xor 2^x, so (0,1) and later (1,0).
    assert hypercube(4) == [(0, 1), (1, 0), (2, 3), (3, 2), (0, 2), (1, 3), (2, 0), (3, 1)]
    assert hypercube(4, "once") == [(0, 1), (2, 3), (0, 2), (1, 3)]
    assert hypercube(3) == [(0, 1), (1, 0), (0, 2), (2, 0)]  # corner 3 is missing
    with pytest.raises(ValueError, match="twice, once"):
        hypercube(4, "thrice")


@pytest.mark.parametrize(
    ("edges", "update", "f", "want"),
    [
        # two peers 1 and 3; by hand: (0,1) then, twice, (1,0) with peer 1 as A
        ("once", "sequential", 0.5, (2.0, 2.5)),
        ("twice", "sequential", 0.5, (2.125, 2.25)),  # (1,0): A=2.5,B=2 -> A'=2.25, B'=0.5*2+0.5*2.25
        ("once", "simultaneous", 0.25, (1.5, 2.5)),
        ("twice", "simultaneous", 0.25, (1.75, 2.25)),  # (1,0): A'=.75*2.5+.25*1.5, B'=.75*1.5+.25*2.5
    ],
)
def test_hypercube_readings_hand_computed(
    edges: str, update: str, f: float, want: tuple[float, float]
) -> None:
    out = apply_schedule([[np.array([1.0])], [np.array([3.0])]], hypercube(2, edges), f, update)
    assert (out[0][0][0], out[1][0][0]) == pytest.approx(want)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_hypercube_stage_pairs_every_peer_once(n: int) -> None:
    stages = hypercube_stages(n, "once")
    assert len(stages) == n.bit_length() - 1
    for x, stage in enumerate(stages):
        peers = [p for pair in stage for p in pair]
        assert sorted(peers) == list(range(n))  # every peer exactly once
        assert all(b == a ^ (1 << x) and a < b for a, b in stage)


def test_hypercube_not_power_of_two() -> None:
    stages = hypercube_stages(10, "once")
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


@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
def test_mixing_matrix_of_one_fusion(update: str) -> None:
    m = mixing_matrix(3, (2, 0), 0.25, update)
    x = np.array([4.0, 5.0, 8.0])
    a, b = fuse(x[2:3], x[0:1], 0.25, update)
    np.testing.assert_allclose(m @ x, [b[0], 5.0, a[0]])


def test_long_run_influence_of_each_peer() -> None:
    # 10 peers, F=0.55, hypercube with each edge once: as printed (sequential) peer 0 ends with 2.5%
    # of the say and peer 7 with 27%; the simultaneous rule gives every peer 10%.
    w = influence(schedule_matrix(10, hypercube(10, "once"), 0.55))
    assert w.min() == pytest.approx(0.025, abs=5e-4) and w.max() == pytest.approx(0.270, abs=5e-4)
    assert int(np.argmax(w)) == 7
    w = influence(schedule_matrix(10, hypercube(10, "once"), 0.55, "simultaneous"))
    np.testing.assert_allclose(w, 0.1)


def test_parallel_stages_keep_order_and_touch_distinct_peers() -> None:
    sched = hypercube(4)
    stages = parallel_stages(sched)
    assert [p for stage in stages for p in stage] == sched
    assert stages[0] == [(0, 1)] and stages[1] == [(1, 0), (2, 3)]
    for stage in stages:
        peers = [p for pair in stage for p in pair]
        assert len(peers) == len(set(peers))


@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
@pytest.mark.parametrize("topo", ["ring", "random", "hypercube"])
@pytest.mark.parametrize("n", [5, 8])
def test_schedule_equals_product_of_mixing_matrices(topo: str, n: int, update: str) -> None:
    rng = np.random.default_rng(0)
    f = 0.37
    peers = [[rng.normal(size=(3, 2)), rng.normal(size=4)] for _ in range(n)]
    sched = schedule(topo, n, seed=1, round_=2)
    fused = apply_schedule(peers, sched, f, update)
    m = schedule_matrix(n, sched, f, update)
    for layer in range(2):
        stacked = np.stack([p[layer] for p in peers])
        expect = np.tensordot(m, stacked, axes=1)
        np.testing.assert_allclose(np.stack([p[layer] for p in fused]), expect, rtol=1e-12, atol=1e-12)


def test_apply_schedule_rejects_self_pair() -> None:
    with pytest.raises(ValueError):
        apply_schedule([[np.ones(1)]], [(0, 0)], 0.5)


@pytest.mark.parametrize(
    ("text", "want", "shown"),
    [
        ("10steps", Interval(10, "steps"), "10steps"),
        ("1epoch", Interval(1, "epochs"), "1epoch"),
        ("2 epochs", Interval(2, "epochs"), "2epochs"),
        ("3", Interval(3, "epochs"), "3epochs"),
        (1, Interval(1, "epochs"), "1epoch"),
    ],
)
def test_interval_parse(text: str | int, want: Interval, shown: str) -> None:
    assert Interval.parse(text) == want
    assert str(want) == shown


@pytest.mark.parametrize("text", ["0steps", "ten steps", "5minutes", "-1epoch"])
def test_interval_rejects_bad_text(text: str) -> None:
    with pytest.raises(ValueError):
        Interval.parse(text)


def test_peer_fusion_rounds_skip_absent_peers_and_keep_their_weights() -> None:
    strat = PeerFusion(4, "ring", rate=0.5, every="10steps")
    assert strat.local_work(2) == {"unit": "steps", "start": 20, "count": 10}
    assert strat.pairs(0, present={0, 2, 3}) == [(2, 3), (3, 0)]
    received = {p: [np.array([float(p + 1)])] for p in (0, 2, 3)}
    out = strat.fuse(0, received)
    assert set(out) == {0, 2, 3}
    want = apply_schedule([received[0], [np.zeros(1)], received[2], received[3]], [(2, 3), (3, 0)], 0.5)
    assert [out[p][0][0] for p in (0, 2, 3)] == [want[p][0][0] for p in (0, 2, 3)]
    avg = PeerFusion(4, "average").fuse(5, received)
    assert all(avg[p][0][0] == pytest.approx(8 / 3) for p in avg)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"topology": "star"},
        {"rate": 1.5},
        {"update": "both"},
        {"hypercube_edges": "thrice"},
        {"every": "0steps"},
    ],
)
def test_peer_fusion_rejects_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PeerFusion(4, **kwargs)


@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
@pytest.mark.parametrize("f", [0.3, 0.5, 0.55, 0.9])
def test_torch_lerp_path_is_within_two_ulp_of_the_written_rule(update: str, f: float) -> None:
    """docs/fusion.md: the numpy path is the paper's formula term by term; the torch engines' lerp is
    the same value, rounded differently."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 100_000)).astype(np.float32)
    written = fuse(a, b, np.float32(f), update)
    lerped = fuse(torch.from_numpy(a), torch.from_numpy(b), f, update)
    ulp = np.spacing(np.maximum(np.abs(a), np.abs(b)))
    for w, t in zip(written, lerped, strict=True):
        assert (np.abs(t.numpy() - w) / ulp).max() <= 2.0
