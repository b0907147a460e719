"""Per-credential rate limits on inference: a token bucket per caller, its rate and burst set per role
(``device``, ``operator``) or per account (a device's ``device:NAME``, a static key's ``key:HASH``, as
the gateway logs them). A caller over its rate is refused 429 with the seconds (and milliseconds) to
wait, before its request is read; one device cannot take a whole cluster. No sockets and no clock:
``check`` takes ``now``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from shoal.security.logins import TokenBucket

MAX_CALLERS = 100_000  # buckets kept; the longest unused is forgotten first (it starts full again)


@dataclass(frozen=True)
class Quota:
    rate: float  # requests a second
    burst: float  # requests at once, after a quiet time


def parse_quota(spec: str) -> tuple[str, Quota]:
    """``WHO=RATE[/BURST]``: WHO a role (device, operator) or an account (device:NAME, key:HASH);
    RATE requests a second; BURST (default: one second's worth, at least 1) at once."""
    who, sep, value = spec.rpartition("=")
    if not sep or not who:
        raise ValueError(f"a quota is WHO=RATE[/BURST] (e.g. device=20/40), not {spec!r}")
    rate_s, _, burst_s = value.partition("/")
    try:
        rate = float(rate_s)
        burst = float(burst_s) if burst_s else max(1.0, rate)
    except ValueError:
        raise ValueError(f"quota {spec!r}: RATE and BURST are numbers") from None
    if not (0 < rate < float("inf")) or not (1 <= burst < float("inf")):
        raise ValueError(f"quota {spec!r}: RATE must be above 0 and BURST at least 1")
    return who.strip(), Quota(rate, burst)


class Quotas:
    def __init__(self, rules: dict[str, Quota]) -> None:
        self.rules = rules
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def rule(self, role: str, who: str) -> Quota | None:
        """The account's own quota, else its role's, else none."""
        return self.rules.get(who) or self.rules.get(role)

    def check(self, role: str, who: str, now: float) -> float:
        """0.0 when the caller may go on (one request counted); else the seconds until it may."""
        q = self.rule(role, who)
        if q is None:
            return 0.0
        b = self.buckets.get(who)
        if b is None:
            if len(self.buckets) >= MAX_CALLERS:
                self.buckets.popitem(last=False)
            b = self.buckets[who] = TokenBucket(q.rate, q.burst)
        else:
            self.buckets.move_to_end(who)
        if b.take(now):
            return 0.0
        return max(1e-3, b.wait_s(now))
