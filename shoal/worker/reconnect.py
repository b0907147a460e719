"""How a worker spaces its attempts to reach its gateway again: a pure policy (tested in isolation)."""

from __future__ import annotations


def backoff_delay(attempt: int, base_s: float = 0.1, cap_s: float = 5.0, jitter: float = 0.0) -> float:
    """Capped exponential back-off for reconnects: base * 2^attempt, at most cap, with ``jitter``
    (a number in [0, 1) drawn by the caller) spreading reconnects of many workers over [d/2, d]."""
    d = min(cap_s, base_s * (2 ** min(attempt, 30)))
    return d * (1.0 - 0.5 * jitter)
