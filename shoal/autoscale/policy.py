"""How many workers a model version should have: a pure function of recent load and the model's
policy. No clock, no I/O; the controller passes ``now`` and the samples it took.

Load is measured in *workers*, the larger of

* model time arriving: requests per second times the model time one request recently took (at the
  batch sizes the workers reached), which is the steady demand, and what a model at zero workers has;
  before any request has been answered this is unknown, and the workers' measured busy time (the
  fraction of time their models computed, summed) stands in for it. Busy time alone would overstate
  the demand while a backlog drains (every worker busy, so more wanted, so more added);
* request slots in use: requests held by workers or waiting for one, over one worker's announced
  capacity. This catches a backlog;
* processor time in use: the fraction of a core each worker's process used (its model, batching and
  link; a worker computes on one core at a time), summed. This catches workers saturated by
  per-request overhead while their model idles (a small or trivial model).

The wanted number is ``ceil(load / target_utilisation)``. It takes effect:

* upwards, when it held over the whole scale-up window (the smallest wanted number in the window is
  above the current one), by at most ``max_step`` workers at a time;
* downwards, when it held over the whole scale-down window (the largest wanted number in the window is
  below the current one), no sooner than ``cooldown_s`` after the last scale event, by at most
  ``max_step``. Up fast, down slowly: load that flaps around a threshold settles on the higher count.

A rising load is met ahead of time: the trend of the model time arriving over the last
``max(2, 2 * lead)`` seconds (a least-squares slope) is projected ``lead`` seconds ahead, the time a
worker takes to start, and the scale-up asks for what the projection wants. Only a steady rise counts
as a trend: from a load already there, three samples or more, none falling by more than a tenth, and a
quarter of a worker or more from the first to the last. The trend follows the arriving work, not the
request slots in use: with one device, slots read 0 or half a worker depending on whether a request
is in flight at the sample, and projecting that jump made a model flap between one and two workers
all night. Falling load is never projected: scaling in waits for the load itself.

Workers still starting count as present, so a worker that never becomes ready does not make the
policy ask for more and more (the controller gives it up after ``start_timeout_s`` and tries again
with back-off). A model whose policy allows zero goes to zero after ``idle_to_zero_s`` with no request
at all, and back to one as soon as a request waits with no worker to serve it (waking it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    min_workers: int = 1
    max_workers: int = 4
    target_utilisation: float = 0.7
    scale_up_window_s: float = 1.0
    scale_down_window_s: float = 30.0
    cooldown_s: float = 10.0
    max_step: int = 2
    idle_to_zero_s: float | None = None  # seconds without a request before going to zero (min 0 only)
    start_timeout_s: float = 60.0  # a launched worker that has not joined by then is given up

    def problems(self) -> list[str]:
        """What is wrong with this policy, each naming its field; empty when it is valid."""
        out = []
        if self.min_workers < 0:
            out.append("min: must be 0 or more")
        if self.max_workers < 1:
            out.append("max: must be 1 or more")
        if self.min_workers > self.max_workers:
            out.append(f"min: {self.min_workers} is above max {self.max_workers}")
        if not 0.05 <= self.target_utilisation <= 1.0:
            out.append("target_utilisation: must be between 0.05 and 1")
        for name in ("scale_up_window_s", "scale_down_window_s", "cooldown_s"):
            if getattr(self, name) < 0:
                out.append(f"{name}: must not be negative")
        if self.max_step < 1:
            out.append("max_step: must be 1 or more")
        if self.start_timeout_s <= 0:
            out.append("start_timeout_s: must be positive")
        if self.idle_to_zero_s is not None:
            if self.idle_to_zero_s <= 0:
                out.append("idle_to_zero_s: must be positive (or null: never)")
            if self.min_workers != 0:
                out.append("idle_to_zero_s: needs min 0")
        elif self.min_workers == 0:
            out.append("min: 0 needs idle_to_zero_s (how long idle before sleeping)")
        return out


@dataclass(frozen=True, slots=True)
class LoadSample:
    """One model version over one sampling interval ending at ``t``."""

    t: float
    arrivals_per_s: float = 0.0  # requests that arrived in the interval, per second
    queue: int = 0  # requests waiting at the gateway for a worker with room
    in_flight: int = 0  # requests held by workers
    busy: float = 0.0  # model time per second, summed over workers (1.0: one worker always computing)
    cpu: float = 0.0  # processor time per second of the workers' processes, summed
    ready: int = 0  # workers taking requests
    starting: int = 0  # workers launched that have not joined yet
    draining: int = 0  # workers finishing what they hold before they leave
    worker_capacity: int = 1  # requests one worker holds (running and queued)
    service_s: float = 0.0  # model time one request takes, recently (0: not known yet)

    @property
    def present(self) -> int:
        return self.ready + self.starting

    def model_time(self) -> float:
        """The work arriving, in workers: requests per second times the model time of one."""
        return self.arrivals_per_s * self.service_s if self.service_s > 0 else self.busy

    def load(self) -> float:
        """The load in workers (see the module's docstring)."""
        slots = (self.in_flight + self.queue) / max(1, self.worker_capacity)
        return max(self.model_time(), slots, self.cpu)

    def idle(self) -> bool:
        return self.arrivals_per_s == 0 and self.queue == 0 and self.in_flight == 0


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    reason: str
    load: float = 0.0


def wanted(s: LoadSample, target_utilisation: float) -> int:
    return math.ceil(s.load() / target_utilisation - 1e-9)


def _within(samples: Sequence[LoadSample], now: float, window_s: float) -> tuple[list[LoadSample], bool]:
    """The samples of the last ``window_s`` (at least the newest), and whether they cover the window."""
    inside = [s for s in samples if s.t > now - window_s] or [samples[-1]]
    covered = samples[0].t <= now - window_s
    return inside, covered


TREND_SAMPLES = 3  # a trend needs at least this many samples with load...
TREND_RISE = 0.25  # ...and to rise by this many workers from the first to the last


def trend(samples: Sequence[LoadSample]) -> float:
    """Least-squares slope of the model time arriving over the samples, in workers per second; 0
    unless it rose steadily from a load already there (``TREND_SAMPLES`` samples or more, none falling by more
    than a tenth, ``TREND_RISE`` workers or more from the first to the last): one request to an idle
    model is not a trend, nor is a flat load that wobbles."""
    ls = [s.model_time() for s in samples]
    while ls and ls[0] <= 0:  # the rise starts where the load does
        ls.pop(0)
    samples = samples[len(samples) - len(ls) :]
    if (
        len(ls) < TREND_SAMPLES
        or ls[-1] - ls[0] < TREND_RISE
        or any(b < 0.9 * a for a, b in zip(ls, ls[1:], strict=False))
    ):
        return 0.0
    ts = [s.t for s in samples]
    mt, ml = sum(ts) / len(ts), sum(ls) / len(ls)
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (x - ml) for t, x in zip(ts, ls, strict=True)) / var if var > 0 else 0.0


def decide(
    samples: Sequence[LoadSample], policy: ScalePolicy, now: float, last_scale_t: float, lead_s: float = 0.0
) -> Decision:
    """The number of workers this model version should have now, and why, in one line. ``lead_s``:
    how long a new worker takes to start (0: react to the load as it is)."""
    p = policy
    if not samples:
        return Decision(max(p.min_workers, 0), "no load measured yet: the minimum")
    latest = samples[-1]
    current = latest.present
    load = latest.load()
    floor = p.min_workers

    if current == 0 and (latest.queue > 0 or latest.arrivals_per_s > 0):
        n = max(1, floor)
        return Decision(n, f"wake: {latest.queue} requests waiting and no worker", load)

    if floor == 0 and p.idle_to_zero_s is not None:
        recent, covered = _within(samples, now, p.idle_to_zero_s)
        if covered and all(s.idle() for s in recent):
            if current > 0:
                return Decision(0, f"no request for {p.idle_to_zero_s:g} s: sleep", load)
            return Decision(0, "asleep", load)
        floor = 1 if current > 0 or not latest.idle() else 0

    up_window, _ = _within(samples, now, p.scale_up_window_s)
    up_to = min(wanted(s, p.target_utilisation) for s in up_window)
    ahead = ""
    if lead_s > 0:
        recent, _ = _within(samples, now, max(2.0, 2 * lead_s))
        slope = trend(recent)
        if slope > 0:
            projected = math.ceil((load + slope * lead_s) / p.target_utilisation - 1e-9)
            if projected > up_to and up_to >= current:
                up_to, ahead = projected, f", {load + slope * lead_s:.2f} expected in {lead_s:.1f} s"
    down_window, down_covered = _within(samples, now, p.scale_down_window_s)
    down_to = max(wanted(s, p.target_utilisation) for s in down_window)

    desired, why = current, "steady"
    if up_to > current:
        desired = min(current + p.max_step, up_to)
        why = f"up: load {load:.2f} workers over {p.scale_up_window_s:g} s{ahead} wants {up_to}"
    elif down_to < current and down_covered and now - last_scale_t >= p.cooldown_s:
        desired = max(current - p.max_step, down_to)
        why = f"down: at most {down_to} wanted over {p.scale_down_window_s:g} s"
    clamped = min(p.max_workers, max(floor, desired))
    if clamped > desired:
        why = f"the minimum is {floor}"
    elif clamped < desired:
        why += f" (the maximum is {p.max_workers})"
    elif desired == current and why == "steady":
        why = f"steady: load {load:.2f} workers"
    return Decision(clamped, why, load)


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    in_flight: int
    joined_at: float


def workers_to_stop(workers: Sequence[WorkerView], n: int) -> list[str]:
    """Which ``n`` workers to drain when scaling in: the least loaded first (they finish soonest and
    lose the least prefetched work), the newest among equals (the oldest have warm caches)."""
    order = sorted(workers, key=lambda w: (w.in_flight, -w.joined_at, w.worker_id))
    return [w.worker_id for w in order[: max(0, n)]]
