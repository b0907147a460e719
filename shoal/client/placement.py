"""Where a request runs when the device holds a model of its own: pure functions of the request and
of what the client has measured, no I/O and no clock of their own (``now`` is passed in), so they are
tested as plain functions (tests/test_placement.py). ``edge.py`` runs them.

Policies:

* ``local``: the device's model, always.
* ``remote``: the cluster, always, with the client's retries and fail-over (the client without a
  local model behaves so).
* ``fastest``: whichever the estimates say answers first: the local model's measured time against
  (frame encoding +) a round trip fitted to the upload size, from the client's own round trips (and
  central's figure for the cluster before there are any). The cluster gets a deadline; past it, or
  with the link down, the device answers itself and says so.
* ``cascade``: the local model first; its answer stands when its top-class probability reaches the
  threshold, else the request goes to the cluster's (larger) model, unless the link is down or the
  round trip would overrun the request's budget: then the local answer stands, marked as a fallback.
* ``split``: the local model is the frozen backbone of a multi-head model; its features go to the
  cluster's model of the heads. No fallback: the device cannot answer alone.

A request's budget (milliseconds) bounds how long the cluster may take: its deadline is what is left
of the budget once the local model's time is set aside, so a late cluster still leaves time for the
local answer.

The link is ``down`` from a failed attempt (unreachable, timed out, or 502/503/504) until an attempt
succeeds; while it is down one request every ``PROBE_EVERY_S`` first probes the cluster with a
liveness check bounded by ``probe_timeout_s`` (a few round trips, not a whole request's deadline),
and is placed again by its policy if the link is back; the others are answered locally at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

POLICIES = ("local", "remote", "fastest", "cascade", "split")
FALLBACK_POLICIES = ("fastest", "cascade")  # the ones that answer locally when the cluster cannot

# Weight of a new sample in the moving average of the encoded size of frames.
EWMA_ALPHA = 0.2
# Local model and encoding times kept: their median is the estimate, so that one run slowed by the
# rest of the device's work does not send the next requests to the cluster.
TIME_WINDOW = 16
# Round trips kept for the fit of time against upload size: enough to average out jitter, few enough
# to follow a link that changes within seconds.
FIT_WINDOW = 24
# Bandwidth assumed before two upload sizes far enough apart have been seen: 1 MB/s (8 Mbit/s, a
# modest LTE uplink); it only shapes the estimate for sizes never sent yet.
PRIOR_MS_PER_BYTE = 1e-3
# While the link is down, one request in this many seconds probes the cluster, for at most
# (min, max) seconds.
PROBE_EVERY_S = 2.0
PROBE_TIMEOUT_S = (0.1, 0.5)
# A remote estimate older than this is refreshed by sending one request to the cluster, so that
# ``fastest`` notices a link or cluster that got faster while it answered locally.
STALE_S = 10.0
# The cluster's deadline under ``fastest``/``cascade``: this multiple of its estimate, at least
# MIN_DEADLINE_S more than it (jitter and a lost segment's retransmission cost a few hundred ms).
DEADLINE_FACTOR = 3.0
MIN_DEADLINE_S = 0.3
# Deadline of a first attempt, before anything was measured: connecting, a route from central and the
# model's labels take several round trips.
FIRST_DEADLINE_S = 2.0


class PlacementError(ValueError):
    """A policy that cannot run for this request (unknown, or it needs a local model there is not)."""


@dataclass(frozen=True)
class Measured:
    """What the client has measured so far. Updated only through the ``observe_*`` functions."""

    local_times: tuple[float, ...] = ()  # the local model's recent times, ms (input preparation included)
    encode_times: tuple[float, ...] = ()  # recent times of encoding a frame as JPEG/PNG, ms
    encoded_ratio: float | None = None  # encoded bytes / raw frame bytes, moving average
    round_trips: tuple[tuple[int, float, float], ...] = ()  # (upload bytes, ms, when) of recent requests
    cluster_ms: float | None = None  # the cluster's own recent latency, from central's route answer
    link_up: bool = True
    link_since: float = 0.0  # when the link was last seen to change state
    last_attempt: float = -math.inf  # when the cluster was last tried

    @property
    def local_ms(self) -> float | None:
        return _median(self.local_times)

    @property
    def encode_ms(self) -> float | None:
        return _median(self.encode_times)


@dataclass(frozen=True)
class Request:
    policy: str
    upload_bytes: int | None  # what would go up to the cluster (None: not known before encoding)
    encode: bool = False  # a raw frame that must be encoded first if it goes up
    budget_ms: float | None = None
    has_local: bool = True


@dataclass(frozen=True)
class Decision:
    run: str  # "local", "remote", "split", or "cascade" (local first, then ``escalate``)
    reason: str
    local_ms: float | None = None  # the estimates it was based on
    remote_ms: float | None = None
    deadline_s: float | None = None  # None: the client's timeout and retries (no local fallback)
    fallback: str | None = None  # why the policy's own choice was not followed
    probe: bool = False  # check the link (liveness) first, then decide again


# ------------------------------------------------------------------------------------ estimates


def _median(xs: tuple[float, ...] | list[float]) -> float | None:
    if not xs:
        return None
    v = sorted(xs)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + EWMA_ALPHA * (new - old)


def _sizes_differ(xs: list[float]) -> bool:
    """Enough round trips of sizes far enough apart to tell the link's speed from its latency."""
    return len(xs) >= 3 and max(xs) > 2 * min(xs) + 1024


def fit_round_trip(samples: tuple[tuple[int, float, float], ...]) -> tuple[float, float] | None:
    """(fixed ms, ms per byte) so that a round trip takes ``fixed + bytes * per_byte``; None with no
    samples. The slope comes from least squares where upload sizes differ enough to tell it, else from
    the prior bandwidth; the fixed part is the median residual, so one retransmission or jitter spike
    does not move the estimate much."""
    if not samples:
        return None
    xs = [float(b) for b, _, _ in samples]
    ys = [ms for _, ms, _ in samples]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if _sizes_differ(xs) and sxx > 0:
        sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
        slope = max(sxy / sxx, 0.0)
    else:  # the prior, but never so steep that the sizes sent would take longer than they did
        slope = min([PRIOR_MS_PER_BYTE] + [y / x for x, y in zip(xs, ys, strict=True) if x > 0])
    fixed = _median([y - slope * x for x, y in zip(xs, ys, strict=True)]) or 0.0
    return max(fixed, 0.0), slope


def bandwidth_bytes_per_s(m: Measured) -> float | None:
    """The upload bandwidth the fit implies (None until sizes far enough apart were sent)."""
    fit = fit_round_trip(m.round_trips)
    if fit is None or fit[1] <= 0 or not _sizes_differ([float(b) for b, _, _ in m.round_trips]):
        return None
    return 1000.0 / fit[1]


def expected_upload(m: Measured, raw_bytes: int) -> int | None:
    """Bytes a raw frame of ``raw_bytes`` will encode to, by the ratio seen so far."""
    return None if m.encoded_ratio is None else max(1, int(raw_bytes * m.encoded_ratio))


def estimate_remote_ms(m: Measured, req: Request) -> float | None:
    """End-to-end time if the cluster answers: encoding (for frames), then the fitted round trip for
    the upload size; None before any round trip (or when the size is not known yet)."""
    fit = fit_round_trip(m.round_trips)
    if fit is None or req.upload_bytes is None:
        return None
    return _encoding_ms(m, req) + fit[0] + fit[1] * req.upload_bytes


def remote_lower_bound_ms(m: Measured, req: Request) -> float | None:
    """Before any round trip: the least the cluster can take, from central's figure for its own
    latency (the link's share is not known yet)."""
    if m.cluster_ms is None:
        return None
    return _encoding_ms(m, req) + m.cluster_ms


def _encoding_ms(m: Measured, req: Request) -> float:
    return (m.encode_ms or 0.0) if req.encode else 0.0


def remote_deadline_s(
    m: Measured, req: Request, remote_ms: float | None, spent_ms: float = 0.0
) -> float:
    """How long the cluster may take before the device answers itself instead."""
    if remote_ms is None:
        d = FIRST_DEADLINE_S
    else:
        d = max(DEADLINE_FACTOR * remote_ms / 1000.0, remote_ms / 1000.0 + MIN_DEADLINE_S)
    if req.budget_ms is not None:
        # Keep the local model's time in hand (unless it already ran: cascade passes it as spent).
        reserve = 0.0 if spent_ms else (m.local_ms or 0.0)
        d = min(d, max((req.budget_ms - spent_ms - reserve) / 1000.0, 0.0))
    return d


def probe_timeout_s(m: Measured) -> float:
    """How long a liveness probe of a link seen down may take: twice the fixed part of the round trip
    (latency and the cluster's time), within PROBE_TIMEOUT_S."""
    fit = fit_round_trip(m.round_trips)
    if fit is None:
        return PROBE_TIMEOUT_S[1]
    return min(max(2 * fit[0] / 1000.0, PROBE_TIMEOUT_S[0]), PROBE_TIMEOUT_S[1])


def link_usable(m: Measured, now: float) -> tuple[bool, bool]:
    """(may the cluster be tried now, is that try a probe of a link seen down)."""
    if m.link_up:
        return True, False
    return (now - m.last_attempt >= PROBE_EVERY_S), True


def _down(m: Measured, now: float) -> str:
    return f"cluster unreachable for {now - m.link_since:.1f} s: answered locally"


# ------------------------------------------------------------------------------------ decisions


def decide(req: Request, m: Measured, now: float) -> Decision:
    """Where this request runs first."""
    if req.policy not in POLICIES:
        raise PlacementError(f"unknown policy '{req.policy}'; choose one of {', '.join(POLICIES)}")
    if req.policy in ("local", "cascade", "split") and not req.has_local:
        raise PlacementError(f"policy '{req.policy}' needs a local model (Client(local=MODEL_DIR))")
    local = m.local_ms
    if req.policy == "local":
        return Decision("local", "policy local", local)
    if req.policy == "remote":
        return Decision("remote", "policy remote", local)
    if req.policy == "split":
        return Decision("split", "policy split: backbone here, heads in the cluster", local)
    if req.policy == "cascade":
        return Decision("cascade", "policy cascade: local model first", local)
    # fastest
    if not req.has_local:
        return Decision("remote", "no local model", None)
    remote = estimate_remote_ms(m, req)
    usable, probing = link_usable(m, now)
    if probing and remote is not None and local is not None and remote >= local and now - m.last_attempt < STALE_S:
        # The link is down, but the cluster was slower anyway: nothing to probe for yet.
        return Decision("local", f"local faster ({local:.1f} <= {remote:.1f} ms), link down", local, remote)
    if not usable:
        return Decision("local", "link down", local, remote, fallback=_down(m, now))
    deadline = remote_deadline_s(m, req, remote)
    if probing:
        return Decision("remote", "probe: is the cluster back?", local, remote, deadline, probe=True)
    if local is None:
        return Decision("remote", "local model not timed yet", None, remote, deadline)
    if remote is None:
        bound = remote_lower_bound_ms(m, req)
        if bound is not None and bound >= local:
            why = f"local faster than the cluster's own latency ({local:.1f} <= {bound:.1f} ms)"
            return Decision("local", why, local, None)
        return Decision("remote", "no round trip measured yet", local, None, deadline)
    newest = max(t for _, _, t in m.round_trips)
    if remote > local and now - newest > STALE_S:
        return Decision("remote", f"remote estimate {now - newest:.0f} s old: measuring again", local, remote, deadline)
    if remote < local:
        return Decision("remote", f"cluster faster ({remote:.1f} < {local:.1f} ms)", local, remote, deadline)
    return Decision("local", f"local faster ({local:.1f} <= {remote:.1f} ms)", local, remote)


def escalate(
    req: Request, m: Measured, confidence: float, threshold: float, spent_ms: float, now: float
) -> Decision:
    """Cascade, after the local model answered with top-class probability ``confidence``: keep that
    answer, or send the request to the cluster."""
    remote = estimate_remote_ms(m, req)
    if confidence >= threshold:
        return Decision("local", f"confident ({confidence:.3f} >= {threshold})", m.local_ms, remote)
    usable, probing = link_usable(m, now)
    if not usable:
        return Decision("local", "link down", m.local_ms, remote, fallback=_down(m, now))
    if req.budget_ms is not None and remote is not None and spent_ms + remote > req.budget_ms:
        why = f"cluster would overrun the budget ({spent_ms:.0f} + {remote:.0f} > {req.budget_ms:.0f} ms)"
        return Decision("local", "budget", m.local_ms, remote, fallback=why + ": answered locally")
    deadline = remote_deadline_s(m, req, remote, spent_ms)
    why = f"not confident ({confidence:.3f} < {threshold})" + (": probing the cluster" if probing else "")
    return Decision("remote", why, m.local_ms, remote, deadline, probe=probing)


# ---------------------------------------------------------------------------------- observations


def observe_local(m: Measured, ms: float) -> Measured:
    return replace(m, local_times=(*m.local_times, ms)[-TIME_WINDOW:])


def observe_encoding(m: Measured, raw_bytes: int, encoded_bytes: int, ms: float) -> Measured:
    ratio = encoded_bytes / max(raw_bytes, 1)
    times = (*m.encode_times, ms)[-TIME_WINDOW:]
    return replace(m, encode_times=times, encoded_ratio=_ewma(m.encoded_ratio, ratio))


def observe_remote(m: Measured, upload_bytes: int, ms: float, now: float) -> Measured:
    """A round trip that succeeded: the link is up."""
    trips = (*m.round_trips, (upload_bytes, ms, now))[-FIT_WINDOW:]
    since = m.link_since if m.link_up else now
    return replace(m, round_trips=trips, link_up=True, link_since=since, last_attempt=now)


def observe_link_up(m: Measured, now: float) -> Measured:
    """A probe of the link answered."""
    since = m.link_since if m.link_up else now
    return replace(m, link_up=True, link_since=since, last_attempt=now)


def observe_failure(m: Measured, now: float) -> Measured:
    """An attempt that failed (unreachable, deadline passed, or the cluster unavailable)."""
    since = now if m.link_up else m.link_since
    return replace(m, link_up=False, link_since=since, last_attempt=now)


def observe_cluster_latency(m: Measured, cluster_ms: float | None) -> Measured:
    return m if cluster_ms is None else replace(m, cluster_ms=cluster_ms)
