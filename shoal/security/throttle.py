"""Failed-login throttling: exponential back-off per key (an account, a device cookie, a source address),
as a pure policy. The caller passes the clock; nothing here sleeps, logs or touches the network.

A key may fail ``free`` times without delay (a person mistyping a password); each failure after that
blocks the key for ``base_s * 2**k`` seconds (k = 0, 1, 2, ...), at most ``cap_s``. While blocked, an
attempt is refused at once, before any password hash runs: so a guessing attacker gets a handful of
hash checks per minute per key instead of as many as the server can compute, and the slow hash stops
being a way to starve legitimate logins. A key that has not failed for ``forget_s`` starts afresh.

With the defaults for accounts (3 free, 2 s doubling, 5 min cap) an attacker gets 7 checks in the
first minute on one account and fewer than one a minute after ten minutes.

Memory is bounded: at most ``max_keys`` keys are kept; the least recently failed go first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(slots=True)
class _Record:
    failures: int
    last_failure: float
    blocked_until: float


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one failure did: ``blocked_s`` > 0 when the key is now blocked for that long, and
    ``newly_blocked`` the first time it is blocked in this run of failures (log that one)."""

    failures: int
    blocked_s: float
    newly_blocked: bool


class Throttle:
    def __init__(
        self,
        free: int = 3,
        base_s: float = 2.0,
        cap_s: float = 300.0,
        forget_s: float = 900.0,
        max_keys: int = 100_000,
    ) -> None:
        if free < 0 or base_s <= 0 or cap_s < base_s or forget_s <= 0 or max_keys < 1:
            raise ValueError("throttle: free >= 0, 0 < base_s <= cap_s, forget_s > 0, max_keys >= 1")
        self.free = free
        self.base_s = base_s
        self.cap_s = cap_s
        self.forget_s = forget_s
        self.max_keys = max_keys
        self._records: OrderedDict[Hashable, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def _live(self, key: Hashable, now: float) -> _Record | None:
        r = self._records.get(key)
        if r is not None and now - r.last_failure > self.forget_s and now >= r.blocked_until:
            del self._records[key]
            return None
        return r

    def failures(self, key: Hashable, now: float) -> int:
        """Failures of ``key`` not yet forgotten."""
        r = self._live(key, now)
        return 0 if r is None else r.failures

    def retry_after(self, key: Hashable, now: float) -> float:
        """Seconds until ``key`` may try again; 0.0 when it may try now."""
        r = self._live(key, now)
        if r is None or now >= r.blocked_until:
            return 0.0
        return r.blocked_until - now

    def failed(self, key: Hashable, now: float) -> Verdict:
        """Record one failed attempt of ``key``."""
        r = self._live(key, now)
        if r is None:
            r = _Record(0, now, 0.0)
            self._records[key] = r
            while len(self._records) > self.max_keys:
                self._records.popitem(last=False)
        else:
            self._records.move_to_end(key)
        was_blocked = r.failures > self.free
        r.failures += 1
        r.last_failure = now
        over = r.failures - self.free
        if over <= 0:
            return Verdict(r.failures, 0.0, False)
        delay = min(self.cap_s, self.base_s * 2.0 ** min(over - 1, 40))
        r.blocked_until = now + delay
        return Verdict(r.failures, delay, not was_blocked)

    def succeeded(self, key: Hashable) -> None:
        """A correct password for ``key``: its failures are forgiven."""
        self._records.pop(key, None)
