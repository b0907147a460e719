"""How a worker linked to several gateways divides its capacity between them: a pure policy (tested
in isolation in ``tests/test_worker_shares.py``).

Each gateway is told its share (the ``capacity`` of the LOADs on its link) and sends the worker at
most that many requests at once, so the gateways together never overcommit it. A fixed equal split
would cap a gateway that gets most of the traffic at a fraction of the worker while the rest idles;
so every gateway keeps a floor (half an equal split: it can always send something) and the rest is
divided by recent demand, the requests each link brought in the last heartbeats.
"""

from __future__ import annotations

DEMAND_WEIGHT = 0.5  # the newest heartbeat's arrivals against the running mean (an EWMA)


def demand(previous: float, arrivals: int) -> float:
    """A link's demand after one more heartbeat that brought ``arrivals`` requests."""
    return (1.0 - DEMAND_WEIGHT) * previous + DEMAND_WEIGHT * arrivals


def capacity_shares(capacity: int, demands: list[float]) -> list[int]:
    """Each link's share of ``capacity``: at least one request each, together ``capacity`` when
    there are no more links than that. Equal where nothing is known of demand."""
    n = len(demands)
    if n == 0:
        return []
    if n == 1:
        return [capacity]
    if capacity <= n:
        return [1] * n
    floor = max(1, capacity // (2 * n))
    rest = capacity - floor * n
    total = sum(max(0.0, d) for d in demands)
    weights = [max(0.0, d) / total for d in demands] if total > 0 else [1.0 / n] * n
    shares = [floor + int(rest * w) for w in weights]
    # What rounding down left goes to the links with the largest remainders, first listed first.
    left = capacity - sum(shares)
    order = sorted(range(n), key=lambda i: (-(rest * weights[i] - int(rest * weights[i])), i))
    for i in order[:left]:
        shares[i] += 1
    return shares
