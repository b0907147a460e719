"""Which password logins central checks, as a pure policy (OWASP's authentication guidance: per-account
lockout for untrusted clients, device cookies for known ones, and a global bound on the hash work).
The caller passes the clock; nothing here sleeps, logs, hashes or touches the network.

* A **known client** presents a valid device cookie for the account it logs in to (central gave it one
  after an earlier correct password). It is never refused for the account's untrusted failures, whoever
  made them; it has a lockout of its own, per cookie, so a stolen cookie tried with wrong passwords
  locks only that cookie (and a locked cookie counts as no cookie).
* An **untrusted** login (no valid cookie) meets the per-account throttle (``Throttle``: 3 free failures,
  then 2 s doubling to 5 min), whatever the source address: there is no per-address lockout, since
  devices behind one NAT or proxy share an address.
* Names that do not exist cost the caller no hash, but are counted as wrong passwords are (throttle and
  budget alike), so answers (401, then 429) do not say which names exist. Their failures are kept in a
  throttle of their own, so a flood of fresh names cannot push real accounts' records out of the bounded
  memory.
* A **budget** (token bucket) bounds the failed hash checks of untrusted logins: an untrusted login to
  an account with recent failures (a *suspect* one) takes a token before its hash runs, and is refused
  (429) when there is none. A login to an account with no recent failures goes ahead even then, since
  it may be a device's first login; if it fails it is charged, down to one burst of debt. So guessers
  get at most ``rate`` checks a second (plus one burst), and one more per existing account they name
  in each ``forget_s``; known clients and first logins are never refused for it, whoever spent it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from shoal.security.throttle import Throttle, Verdict


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; ``charge`` may run up to ``debt`` below zero."""

    def __init__(self, rate: float, burst: float, debt: float | None = None) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("token bucket: rate > 0, burst >= 1")
        self.rate = rate
        self.burst = burst
        self.debt = burst if debt is None else debt
        self.tokens = burst
        self._at: float | None = None

    def _refill(self, now: float) -> None:
        if self._at is not None and now > self._at:
            self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        if self._at is None or now > self._at:
            self._at = now

    def take(self, now: float) -> bool:
        """One token, when there is one."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def charge(self, now: float) -> None:
        """One token whether or not there is one, down to ``-debt``."""
        self._refill(now)
        self.tokens = max(-self.debt, self.tokens - 1.0)

    def give_back(self, now: float) -> None:
        self._refill(now)
        self.tokens = min(self.burst, self.tokens + 1.0)

    def wait_s(self, now: float) -> float:
        """Seconds until a token is there; 0.0 when one is."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one login before its password is checked. ``wait_s`` > 0: refuse it (429) for that
    long, ``why`` says which limit ("account" or "budget"). Otherwise check it, and hand the decision
    back to ``failed`` / ``succeeded`` / ``cancelled``."""

    wait_s: float
    why: str = ""
    cookie: Hashable | None = None  # the known client's cookie id; None: an untrusted login
    token: bool = False  # a budget token was taken for it


class LoginPolicy:
    def __init__(
        self,
        budget_per_s: float = 1.0,
        budget_burst: float = 10.0,
        free: int = 3,
        base_s: float = 2.0,
        cap_s: float = 300.0,
        forget_s: float = 900.0,
        max_keys: int = 100_000,
    ) -> None:
        def throttle() -> Throttle:
            return Throttle(free=free, base_s=base_s, cap_s=cap_s, forget_s=forget_s, max_keys=max_keys)

        self.accounts = throttle()  # untrusted failures of existing accounts
        self.unknown = throttle()  # failures of names that do not exist
        self.cookies = throttle()  # failures of known clients, per cookie
        self.budget = TokenBucket(budget_per_s, budget_burst)

    def suspect(self, account: Hashable, now: float) -> bool:
        """The account (or unknown name) failed an untrusted login within ``forget_s``."""
        return self.accounts.failures(account, now) > 0 or self.unknown.failures(account, now) > 0

    def decide(self, account: Hashable, cookie: Hashable | None, now: float) -> Decision:
        """``cookie``: the id of a valid device cookie the login presents for this same account."""
        if cookie is not None:
            wait = self.cookies.retry_after(cookie, now)
            if wait == 0.0:
                return Decision(0.0, cookie=cookie)
            # A locked cookie is no cookie: the login is judged as an untrusted one.
        wait = max(self.accounts.retry_after(account, now), self.unknown.retry_after(account, now))
        if wait > 0.0:
            return Decision(wait, "account")
        if not self.suspect(account, now):
            return Decision(0.0)  # perhaps a first login: never refused for the budget
        if self.budget.take(now):
            return Decision(0.0, token=True)
        return Decision(max(1.0, self.budget.wait_s(now)), "budget")

    def failed(self, account: Hashable, decision: Decision, exists: bool, now: float) -> Verdict:
        """The password was wrong (``exists``: a hash was checked) or the name unknown (no hash ran).
        The verdict of the throttle that counted it: the account's, the unknown name's or the cookie's."""
        if decision.cookie is not None:
            return self.cookies.failed(decision.cookie, now)
        # An unknown name is charged as if its hash had run: were it not, how fast the budget drains
        # would tell which names exist.
        if not decision.token:
            self.budget.charge(now)
        return (self.accounts if exists else self.unknown).failed(account, now)

    def succeeded(self, account: Hashable, decision: Decision, now: float) -> None:
        if decision.token:
            self.budget.give_back(now)
        if decision.cookie is not None:
            # Not the account's failures: an attacker would get fresh free guesses at each of its logins.
            self.cookies.succeeded(decision.cookie)
        else:
            self.accounts.succeeded(account)

    def cancelled(self, decision: Decision, now: float) -> None:
        """The check did not happen (the database did not answer): its token goes back."""
        if decision.token:
            self.budget.give_back(now)
