"""Placement policies (shoal/client/placement.py) as pure functions: a request and what the client
measured in, a decision out; no model, no socket, no clock."""

from __future__ import annotations

import random

import pytest

from shoal.client import placement as pl
from shoal.client.placement import Measured, Request

NOW = 1000.0


def measured(local_ms: float = 5.0, trips: list[tuple[int, float]] | None = None, at: float = NOW) -> Measured:
    m = pl.observe_local(Measured(), local_ms)
    for size, ms in trips or []:
        m = pl.observe_remote(m, size, ms, at)
    return m


def req(policy: str, size: int | None = 30_000, **kw) -> Request:
    return Request(policy, size, **kw)


def test_local_and_remote_do_as_they_say_whatever_was_measured():
    m = measured(local_ms=500.0, trips=[(30_000, 1.0)] * 3)
    assert pl.decide(req("local"), m, NOW).run == "local"
    d = pl.decide(req("remote"), m, NOW)
    # remote is today's client: full retries and timeout, no deadline, no local fallback
    assert d.run == "remote" and d.deadline_s is None


def test_unknown_policy_and_missing_local_model_are_refused():
    with pytest.raises(pl.PlacementError, match="unknown policy 'nearest'"):
        pl.decide(req("nearest"), Measured(), NOW)
    for policy in ("local", "cascade", "split"):
        with pytest.raises(pl.PlacementError, match="needs a local model"):
            pl.decide(req(policy, has_local=False), Measured(), NOW)
    # fastest without a local model is simply remote
    assert pl.decide(req("fastest", has_local=False), Measured(), NOW).run == "remote"


def test_fastest_picks_the_smaller_estimate():
    slow_link = measured(local_ms=12.0, trips=[(30_000, 80.0)] * 5)
    d = pl.decide(req("fastest"), slow_link, NOW)
    assert d.run == "local" and d.remote_ms == pytest.approx(80.0)
    fast_link = measured(local_ms=120.0, trips=[(30_000, 25.0)] * 5)
    d = pl.decide(req("fastest"), fast_link, NOW)
    assert d.run == "remote" and d.deadline_s == pytest.approx(max(3 * 0.025, 0.025 + pl.MIN_DEADLINE_S))


def test_fastest_counts_frame_encoding_on_the_remote_side():
    m = measured(local_ms=30.0, trips=[(30_000, 22.0)] * 5)
    assert pl.decide(req("fastest"), m, NOW).run == "remote"
    m = pl.observe_encoding(m, raw_bytes=2_764_800, encoded_bytes=30_000, ms=15.0)
    size = pl.expected_upload(m, 2_764_800)
    assert size == 30_000
    d = pl.decide(req("fastest", size, encode=True), m, NOW)
    assert d.run == "local" and d.remote_ms == pytest.approx(37.0)


def test_round_trip_fit_learns_bandwidth_from_different_sizes():
    # 20 ms fixed + 4 MB/s: 0.25 ms per KB
    trips = [(s, 20.0 + s * 0.25e-3) for s in (1_000, 50_000, 200_000, 10_000, 100_000)]
    m = measured(trips=trips)
    fixed, per_byte = pl.fit_round_trip(m.round_trips)
    assert fixed == pytest.approx(20.0, abs=0.01) and per_byte == pytest.approx(0.25e-3)
    assert pl.bandwidth_bytes_per_s(m) == pytest.approx(4e6)
    assert pl.estimate_remote_ms(m, req("fastest", 400_000)) == pytest.approx(120.0)
    # one size only: the prior bandwidth shapes other sizes, the observed time is kept for this one
    one = measured(trips=[(30_000, 50.0)] * 4)
    assert pl.estimate_remote_ms(one, req("fastest", 30_000)) == pytest.approx(50.0)
    assert pl.bandwidth_bytes_per_s(one) is None


def test_a_retransmission_spike_barely_moves_the_estimate():
    m = measured(trips=[(30_000, 40.0)] * 9 + [(30_000, 450.0)])
    assert pl.estimate_remote_ms(m, req("fastest")) == pytest.approx(40.0)


def test_fastest_measures_the_cluster_first_unless_central_says_it_cannot_win():
    m = measured(local_ms=3.0)
    d = pl.decide(req("fastest"), m, NOW)
    assert d.run == "remote" and d.deadline_s == pl.FIRST_DEADLINE_S
    m = pl.observe_cluster_latency(m, 9.0)  # central: the cluster alone takes 9 ms
    assert pl.decide(req("fastest"), m, NOW).run == "local"
    assert pl.decide(req("fastest"), pl.observe_cluster_latency(measured(local_ms=30.0), 9.0), NOW).run == "remote"


def test_a_stale_remote_estimate_is_measured_again():
    m = measured(local_ms=10.0, trips=[(30_000, 60.0)] * 3, at=NOW)
    assert pl.decide(req("fastest"), m, NOW + 1).run == "local"
    d = pl.decide(req("fastest"), m, NOW + pl.STALE_S + 1)
    assert d.run == "remote" and "measuring again" in d.reason


def test_link_down_answers_locally_and_probes_now_and_then():
    m = measured(local_ms=100.0, trips=[(30_000, 20.0)] * 3)
    m = pl.observe_failure(m, NOW)
    d = pl.decide(req("fastest"), m, NOW + 0.5)
    assert d.run == "local" and d.fallback and "unreachable for 0.5 s" in d.fallback
    d = pl.decide(req("fastest"), m, NOW + pl.PROBE_EVERY_S)
    assert d.run == "remote" and d.probe and d.deadline_s is not None
    # the probe is a liveness check bounded by a few round trips, not the request's deadline
    assert pl.probe_timeout_s(m) == pytest.approx(pl.PROBE_TIMEOUT_S[0])
    assert pl.probe_timeout_s(m) < d.deadline_s
    slow = pl.observe_failure(measured(trips=[(30_000, 150.0)] * 3), NOW)
    # 150 ms, of which 30 ms the 30 KB at the prior bandwidth: twice the other 120 ms
    assert pl.probe_timeout_s(slow) == pytest.approx(0.24) and pl.probe_timeout_s(Measured()) == pl.PROBE_TIMEOUT_S[1]
    up = pl.observe_link_up(m, NOW + pl.PROBE_EVERY_S)  # the probe answered: decided again, normally
    assert up.link_up and pl.decide(req("fastest"), up, NOW + pl.PROBE_EVERY_S).probe is False
    m = pl.observe_failure(m, NOW + pl.PROBE_EVERY_S)  # the probe failed: down since the first failure
    assert m.link_since == NOW and pl.decide(req("fastest"), m, NOW + pl.PROBE_EVERY_S + 1).run == "local"
    m = pl.observe_remote(m, 30_000, 20.0, NOW + 10)  # the next probe got through
    assert m.link_up and m.link_since == NOW + 10
    assert pl.decide(req("fastest"), m, NOW + 10.1).run == "remote"


def test_cascade_keeps_confident_answers_and_escalates_the_rest():
    m = measured(local_ms=4.0, trips=[(30_000, 50.0)] * 3)
    assert pl.decide(req("cascade"), m, NOW).run == "cascade"
    keep = pl.escalate(req("cascade"), m, confidence=0.995, threshold=0.99, spent_ms=4.0, now=NOW)
    assert keep.run == "local" and keep.fallback is None
    up = pl.escalate(req("cascade"), m, confidence=0.6, threshold=0.99, spent_ms=4.0, now=NOW)
    assert up.run == "remote" and up.deadline_s is not None


def test_cascade_falls_back_on_a_down_link_and_on_the_budget():
    m = pl.observe_failure(measured(local_ms=4.0, trips=[(30_000, 50.0)] * 3), NOW)
    d = pl.escalate(req("cascade"), m, 0.6, 0.99, 4.0, NOW + 0.1)
    assert d.run == "local" and "unreachable" in d.fallback
    assert pl.escalate(req("cascade"), m, 0.6, 0.99, 4.0, NOW + pl.PROBE_EVERY_S).probe
    m = measured(local_ms=4.0, trips=[(30_000, 50.0)] * 3)
    d = pl.escalate(req("cascade", budget_ms=40.0), m, 0.6, 0.99, 4.0, NOW)
    assert d.run == "local" and "budget" in d.fallback
    d = pl.escalate(req("cascade", budget_ms=100.0), m, 0.6, 0.99, 4.0, NOW)
    # the cluster may use what is left of the budget, no more
    assert d.run == "remote" and d.deadline_s == pytest.approx(0.096)


def test_the_budget_leaves_time_for_the_local_answer():
    m = measured(local_ms=10.0, trips=[(30_000, 8.0)] * 3)
    d = pl.decide(req("fastest", budget_ms=50.0), m, NOW)
    assert d.run == "remote" and d.deadline_s == pytest.approx(0.040)


def test_split_never_falls_back():
    m = pl.observe_failure(measured(), NOW)
    d = pl.decide(req("split"), m, NOW)
    assert d.run == "split" and d.deadline_s is None


def test_estimates_stay_finite_and_non_negative_for_any_round_trips():
    rng = random.Random(7)
    for _ in range(200):
        m = measured(trips=[(rng.randint(0, 3_000_000), rng.uniform(0.1, 5000)) for _ in range(rng.randint(1, 30))])
        fixed, per_byte = pl.fit_round_trip(m.round_trips)
        assert fixed >= 0 and per_byte >= 0
        assert 0 <= pl.estimate_remote_ms(m, req("fastest", rng.randint(0, 3_000_000))) < float("inf")
        assert len(m.round_trips) <= pl.FIT_WINDOW


def test_fastest_does_not_probe_a_down_link_while_the_device_is_faster_anyway():
    m = pl.observe_failure(measured(local_ms=10.0, trips=[(30_000, 60.0)] * 3), NOW)
    d = pl.decide(req("fastest"), m, NOW + pl.PROBE_EVERY_S)
    assert d.run == "local" and not d.probe and d.fallback is None
    d = pl.decide(req("fastest"), m, NOW + pl.STALE_S)  # but now and then, to learn what changed
    assert d.run == "remote" and d.probe


def test_one_slow_local_run_does_not_send_requests_to_the_cluster():
    m = measured(local_ms=10.0, trips=[(30_000, 30.0)] * 3)
    for ms in (11.0, 9.0, 10.5, 9.5):
        m = pl.observe_local(m, ms)
    m = pl.observe_local(m, 400.0)  # the device was busy with something else once
    assert pl.decide(req("fastest"), m, NOW).run == "local"
    assert len(pl.observe_local(Measured(local_times=(1.0,) * pl.TIME_WINDOW), 2.0).local_times) == pl.TIME_WINDOW
