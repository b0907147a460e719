"""Load shapes the elastic demo, the autoscaling benchmark and the policy's tests share."""

from __future__ import annotations

import math

NIGHT = 0.05  # load at night, as a fraction of the peak


def day_shape(x: float) -> float:
    """Load as a fraction of the day's peak at ``x`` in [0, 1) of one day: night, a morning rise, the
    peak at midday, an evening fall, night again (a raised cosine over the middle 60 % of the day)."""
    d = abs((x % 1.0) - 0.5)
    if d >= 0.3:
        return NIGHT
    return NIGHT + (1.0 - NIGHT) * (0.5 + 0.5 * math.cos(math.pi * d / 0.3))
