"""The failed-login throttle, central's login policy (device cookies, the budget of failed checks) and
the gateway's permission rules, as pure functions."""

import pytest

from shoal.gateway.auth import Principal, parse_api_key, permit
from shoal.security.logins import LoginPolicy, TokenBucket
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


def test_failures_are_counted_until_forgotten():
    t = Throttle(free=3, forget_s=30.0)
    assert t.failures("a", 0.0) == 0
    t.failed("a", 0.0)
    t.failed("a", 1.0)
    assert t.failures("a", 2.0) == 2 and t.failures("a", 40.0) == 0


def test_token_bucket_refills_at_its_rate_and_runs_into_bounded_debt():
    b = TokenBucket(rate=2.0, burst=3.0, debt=4.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.wait_s(0.0) == pytest.approx(0.5)
    assert b.take(0.5) and not b.take(0.5)
    for _ in range(10):
        b.charge(0.5)
    assert b.tokens == -4.0  # no deeper than the debt
    assert b.wait_s(0.5) == pytest.approx(2.5)
    b.give_back(0.5)
    assert b.tokens == -3.0
    assert b.take(100.0) and b.tokens == 2.0  # never more than the burst saved


def test_a_known_client_is_never_refused_for_others_failures():
    p = LoginPolicy(budget_per_s=1.0, budget_burst=2.0)
    acct = ("device", "cam")
    for now in range(20):  # a guesser, as fast as it is let
        d = p.decide(acct, None, float(now))
        if d.wait_s == 0.0:
            p.failed(acct, d, exists=True, now=float(now))
    assert p.decide(acct, None, 20.0).wait_s > 0  # untrusted: locked out
    known = p.decide(acct, "cookie-1", 20.0)
    assert known.wait_s == 0.0 and known.cookie == "cookie-1"
    p.succeeded(acct, known, 20.0)
    assert p.decide(acct, None, 20.0).wait_s > 0  # its success forgives no guesser


def test_a_stolen_cookie_tried_with_wrong_passwords_locks_that_cookie_only():
    p = LoginPolicy()
    acct = ("device", "cam")
    for _ in range(4):
        d = p.decide(acct, "stolen", 0.0)
        assert d.cookie == "stolen"
        p.failed(acct, d, exists=True, now=0.0)
    d = p.decide(acct, "stolen", 0.0)
    assert d.cookie is None and d.wait_s == 0.0  # locked: judged as untrusted, whose record is clean
    assert p.decide(acct, "the-owners", 0.0).cookie == "the-owners"
    assert p.accounts.failures(acct, 0.0) == 0


def test_the_budget_refuses_only_suspect_accounts_of_untrusted_clients():
    p = LoginPolicy(budget_per_s=1.0, budget_burst=3.0)
    now = 0.0
    hashed = 0
    for i in range(200):  # a guesser over 50 existing accounts, 4 guesses each, in 2 s
        acct = ("device", f"victim-{i % 50}")
        d = p.decide(acct, None, now)
        if d.wait_s == 0.0:
            hashed += 1
            p.failed(acct, d, exists=True, now=now)
        now += 0.01
    assert hashed <= 50 + 3 + 2  # one first guess per account, the burst, the rate
    refused = p.decide(("device", "victim-1"), None, now)
    assert refused.wait_s >= 1.0 and refused.why in ("budget", "account")
    assert p.decide(("device", "new-device"), None, now).wait_s == 0.0  # a first login goes ahead
    assert p.decide(("device", "victim-1"), "its-cookie", now).wait_s == 0.0  # so does a known client


def test_unknown_names_are_answered_as_wrong_passwords_are():
    p = LoginPolicy(budget_per_s=1.0, budget_burst=2.0)
    real, ghost = ("device", "real"), ("device", "ghost")
    answers = {}
    for acct, exists in ((real, True), (ghost, False)):
        seen = []
        for _ in range(5):
            d = p.decide(acct, None, 0.0)
            seen.append(d.wait_s > 0)
            if d.wait_s == 0.0:
                p.failed(acct, d, exists=exists, now=0.0)
        answers[acct] = seen
        p.budget.tokens = 2.0  # each name against the same budget
    assert answers[real] == answers[ghost] == [False, False, True, True, True]  # which name exists? unsaid
    for i in range(200_000):  # a flood of fresh names: kept apart from the accounts' records
        n = ("device", f"fresh-{i}")
        p.failed(n, p.decide(n, None, 1.0), exists=False, now=1.0)
    assert p.accounts.failures(real, 1.0) == 2
    assert p.decide(("device", "first-login"), None, 1.0).wait_s == 0.0  # the spent budget refuses no first login


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
