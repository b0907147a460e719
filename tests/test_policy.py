"""The gateway's scheduling policies, as pure functions."""

from dataclasses import dataclass

from shoal.gateway.policy import ewma, newest_version, pick_worker, retry_after_s
from shoal.worker.reconnect import backoff_delay


@dataclass
class W:
    in_flight: int
    capacity: int
    latency_ewma_ms: float = 0.0
    accepting: bool = True


def test_least_loaded_relative_to_capacity():
    assert pick_worker([W(4, 8), W(1, 8), W(3, 4)]) == 1
    assert pick_worker([W(8, 16), W(3, 4)]) == 0  # 50% beats 75%


def test_never_beyond_capacity_and_never_draining():
    assert pick_worker([W(2, 2), W(5, 5)]) is None
    assert pick_worker([W(0, 4, accepting=False), W(3, 4)]) == 1
    assert pick_worker([]) is None


def test_ties_go_to_lower_latency_then_first():
    assert pick_worker([W(1, 4, 9.0), W(1, 4, 2.0)]) == 1
    assert pick_worker([W(1, 4, 2.0), W(1, 4, 2.0)]) == 0


def test_versions_sort_numerically():
    assert newest_version(["1", "10", "9"]) == "10"
    assert newest_version([]) is None


def test_backoff_is_capped_exponential_with_jitter():
    assert [backoff_delay(i, 0.1, 2.0) for i in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    assert backoff_delay(100, 0.1, 2.0) == 2.0
    assert 1.0 <= backoff_delay(10, 0.1, 2.0, jitter=0.99) <= 2.0


def test_ewma_and_retry_after():
    assert ewma(0.0, 5.0) == 5.0
    assert ewma(10.0, 0.0, 0.5) == 5.0
    assert retry_after_s(0, 0, 0) == 1
    assert retry_after_s(1000, 10, 100) == 10
    assert retry_after_s(10**9, 1, 1000) == 30


def test_version_policies():
    from shoal.gateway.policy import parse_version_policy, visible_versions

    live = ["1", "2", "10"]
    assert visible_versions(None, live) == {"1", "2", "10"}
    assert visible_versions(parse_version_policy({"policy": "all"}, "v"), live) == {"1", "2", "10"}
    assert visible_versions(parse_version_policy({"policy": "latest", "n": 2}, "v"), live) == {"2", "10"}
    assert visible_versions(
        parse_version_policy({"policy": "specific", "versions": [1, "3"]}, "v"), live
    ) == {"1"}
    import pytest

    for bad in [
        {"policy": "newest"},
        {"policy": "latest", "n": 0},
        {"policy": "specific", "versions": []},
        "all",
    ]:
        with pytest.raises(ValueError, match="v"):
            parse_version_policy(bad, "versions.m")
