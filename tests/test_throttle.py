"""The failed-login throttle and the gateway's permission rules, as pure functions."""

import pytest

from shoal.gateway.auth import Principal, parse_api_key, permit
from shoal.security.throttle import Throttle


def test_free_failures_then_doubling_blocks_up_to_the_cap():
    t = Throttle(free=3, base_s=2.0, cap_s=10.0, forget_s=100.0)
    now = 0.0
    for i in range(3):
        v = t.failed("acct", now)
        assert v.blocked_s == 0.0 and v.failures == i + 1
        assert t.retry_after("acct", now) == 0.0
    blocks = []
    for _ in range(5):
        v = t.failed("acct", now)
        blocks.append(v.blocked_s)
        assert t.retry_after("acct", now) == pytest.approx(v.blocked_s)
        now += v.blocked_s  # the guesser waits exactly as told
    assert blocks == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_newly_blocked_is_said_once_per_run_of_failures():
    t = Throttle(free=1, base_s=1.0, cap_s=60.0, forget_s=100.0)
    flags = [t.failed("ip", now).newly_blocked for now in (0.0, 0.0, 5.0, 50.0)]
    assert flags == [False, True, False, False]


def test_success_forgives_and_quiet_time_forgets():
    t = Throttle(free=0, base_s=1.0, cap_s=60.0, forget_s=30.0)
    t.failed("a", 0.0)
    assert t.retry_after("a", 0.5) == pytest.approx(0.5)
    t.succeeded("a")
    assert t.retry_after("a", 0.5) == 0.0
    t.failed("b", 0.0)
    t.failed("b", 1.0)
    assert t.failed("b", 100.0).failures == 1  # forgotten after 30 quiet seconds


def test_keys_are_bounded():
    t = Throttle(max_keys=100)
    for i in range(1000):
        t.failed(f"addr-{i}", 0.0)
    assert len(t) == 100


def test_an_attacker_gets_a_handful_of_checks_per_minute():
    t = Throttle()  # central's account defaults
    now, checks = 0.0, 0
    while now < 600:
        if t.retry_after("victim", now) == 0.0:
            t.failed("victim", now)
            checks += 1
            if now < 60:
                first_minute = checks
        now += 0.01  # a guess every 10 ms
    assert first_minute <= 8 and checks <= 14


@pytest.mark.parametrize(
    "spec, key, role, models",
    [
        ("operator:k1", "k1", "operator", None),
        ("scrape:k2", "k2", "scrape", None),
        ("device:echo+mnist-cnn:k3", "k3", "device", {"echo", "mnist-cnn"}),
        ("plain-key", "plain-key", "operator", None),
    ],
)
def test_api_key_declarations(spec, key, role, models):
    k, p, _ = parse_api_key(spec)
    assert (k, p.role) == (key, role) and (p.models == (frozenset(models) if models else None))
    assert p.who.startswith("key:") and key not in p.who  # never the key itself


@pytest.mark.parametrize("spec", ["device::k", "device:echo:", "device:echo", "operator:", ""])
def test_malformed_api_key_declarations(spec):
    with pytest.raises(ValueError):
        parse_api_key(spec)


def test_permissions():
    dev = Principal("device", "device:cam", frozenset({"echo"}), "2")
    assert permit(dev, "infer", "echo", "2") is None
    assert permit(dev, "infer", "echo", None) is None
    assert "version '2'" in permit(dev, "infer", "echo", "3")
    assert "'other'" in permit(dev, "model", "other")
    assert "operator" in permit(dev, "status")
    scrape = Principal("scrape", "key:1")
    assert permit(scrape, "metrics") is None and permit(scrape, "infer", "echo") is not None
    op = Principal("operator", "key:2")
    assert all(permit(op, a, "any") is None for a in ("infer", "status", "results", "repository", "metrics"))
