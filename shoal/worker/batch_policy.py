"""When to run a batch: at once, or after waiting a little for more requests. Pure functions of what
the inference thread knows (rows waiting, the batch limit and window, the recent arrival rate).

A batch window is worth waiting only when it is about to fill: with the model idle and a batch not
full, waiting is pure latency unless more requests are about to come. So the thread waits only when
the recent arrival rate predicts the batch fills before the window ends, and then only until it is
predicted to fill; otherwise it runs what it has at once. Requests still gather into batches under
load: while a batch runs, those that arrive wait in the queue and form the next one.
"""

from __future__ import annotations

from collections import deque

HORIZON_S = 1.0  # arrivals older than this say nothing about the rate now
KEPT = 256  # arrivals remembered (at most)


class ArrivalRate:
    """Rows per second arriving recently (over the last second or the last ``KEPT`` arrivals)."""

    def __init__(self) -> None:
        self._seen: deque[tuple[float, int]] = deque(maxlen=KEPT)
        self._rows = 0

    def observe(self, t: float, rows: int) -> None:
        if len(self._seen) == self._seen.maxlen:
            self._rows -= self._seen[0][1]
        self._seen.append((t, rows))
        self._rows += rows

    def rate(self, now: float) -> float:
        seen = self._seen
        while seen and now - seen[0][0] > HORIZON_S:
            self._rows -= seen.popleft()[1]
        if len(seen) < 2:
            return 0.0
        span = now - seen[0][0]
        # The first arrival opens the span; the rows after it arrived within it.
        return (self._rows - seen[0][1]) / span if span > 0 else 0.0


def wait_s(pending_rows: int, max_rows: int, window_s: float, rate_rows_per_s: float) -> float:
    """How long to wait for more rows before running a batch of ``pending_rows``: the time the batch
    is predicted to take to fill, when that is within the window; else 0 (run now)."""
    if max_rows <= 0 or window_s <= 0 or pending_rows >= max_rows or rate_rows_per_s <= 0:
        return 0.0
    fill = (max_rows - pending_rows) / rate_rows_per_s
    return fill if fill <= window_s else 0.0
