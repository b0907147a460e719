"""Which gateways and central replicas a device tries, and how: pure functions of what the client has
seen (when each gateway was found dead, when each replica last answered) and of the time passed in;
no I/O and no clock of their own, so they are tested as plain functions (tests/test_failover.py).
``core.py`` applies them; ``http.py`` says what kind of failure an exchange met.

* **A failure says whether anyone is there.** Nothing connected (refused, no route, the connect timed
  out), or the connection was reset or closed before anything came back: the gateway is **dead**
  (its process or its machine is gone). An answer that did not come in time is **silent**: the
  gateway may be dead (a machine that vanished closes nothing, so a request on an open connection
  just waits) or slow (a worker holding its batch); a silent gateway's liveness is then probed, off
  the request path (``PROBE_TIMEOUT_S``): a probe that fails in any way finds it dead, one that is
  answered finds it alive. So a timed-out request alone never marks a gateway dead (the lab found a
  device skipping a fall-back that had only timed out behind a worker holding its batch).
* **A gateway found dead is skipped** on a request's first attempt for ``DEAD_KEPT_S``, while the
  route has another gateway to try; the request then asks central for a route without it at once,
  rather than waiting ``NEXT_GATEWAY_AFTER_S`` on it. Later attempts try every gateway of their
  route. The mark ends sooner when the gateway answers, or when central names it in a route asked
  for ``CENTRAL_SEES_S`` after it was found dead: central names only gateways whose reports it had
  within the last three intervals, so it has heard from it since (the lab found a gateway healed
  from a partition still skipped 25 s on, which sent devices to central when the other was lost).
* **After a silent gateway, central first.** When the route's gateway answered nothing in time on a
  request's first attempt, the request asks central for a route without it before trying a fall-back
  that has not answered this device within ``GATEWAY_HEARD_S``: central hears every gateway's reports
  and leaves out those it stopped hearing, while a fall-back this device has not used may have been
  lost unseen (the lab found a device whose route still named a gateway lost 30 s before, which its
  requests had never been sent to, wait 2 s at each). A fall-back heard from lately is tried at once.
* **A route without a slow gateway, asked for ahead.** A request still unanswered halfway through its
  bounded wait at a gateway (``PREFETCH_AT``) has the client ask central, beside the requests, for a
  route without that gateway (once per gateway per ``STANDBY_S``); if the gateway then fails, the
  request goes on with that route at once instead of asking central only then (the lab found central
  taking 0.4 to 0.9 s to answer under load, which put devices just past 3 s). A gateway that answers
  in the end costs one route request.
* **Central's replicas** are asked in turn while the first of them answered within ``HEARD_S``;
  otherwise all at once, the first answer winning: a replica whose machine vanished since it last
  answered this device would otherwise cost a bounded wait on the request path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# How long a gateway found dead is skipped on a request's first attempt (a probe, or a request that
# it answers, clears it sooner). Long enough to outlast central's route renewals (a route still naming
# a lost gateway is asked for again 10 s after it failed), short enough that a gateway that came back
# is tried again soon even when central still names it behind others.
DEAD_KEPT_S = 30.0
# The longest a liveness probe of a silent gateway may take: as long as a request waits at a gateway
# with another behind it (a lost SYN is retransmitted after 1 s; a slow gateway's event loop still
# answers its liveness at once).
PROBE_TIMEOUT_S = 2.0
# A fall-back gateway that answered this device within this long is tried at once after the route's
# first gateway fell silent; one that did not is checked with central first.
GATEWAY_HEARD_S = 10.0
# A request unanswered at a gateway after this share of its bounded wait has a route without that
# gateway asked for ahead; such a route is used within STANDBY_S of being asked for, and asked for
# again for the same gateway only after that.
PREFETCH_AT = 0.5
STANDBY_S = 10.0
# Central lists a gateway as live until three of its report intervals (1 s by default) pass without
# a report: one it names in a route asked for this long after the gateway was found dead has reported
# since.
CENTRAL_SEES_S = 5.0
# A replica that answered this device within this long is asked alone first (in turn); otherwise the
# replicas are asked at once. Route requests are rare (a route lasts until shortly before its token
# expires, or is renewed every 10 s after a failure), so this costs central little.
HEARD_S = 5.0

# What an exchange that failed met (``http.failure_kind``).
REFUSED = "refused"  # no connection: refused, no route to the host, the TLS handshake failed
CONNECT_TIMEOUT = "connect-timeout"  # no answer to the connect
RESET = "reset"  # the connection reset or closed before an answer came
TIMEOUT = "timeout"  # connected, sent, no answer in time
DEAD_KINDS = (REFUSED, CONNECT_TIMEOUT, RESET)


def found_dead(kind: str) -> bool:
    """A failure that says nothing is there (anything else, a timeout or an unknown kind, says only
    that no answer came)."""
    return kind in DEAD_KINDS


def needs_probe(kind: str, url: str, dead: Mapping[str, float], probing: set[str], now: float) -> bool:
    """After a gateway's silent failure: probe its liveness, unless it is already known dead or being
    probed."""
    return not found_dead(kind) and not is_dead(url, dead, now) and url not in probing


def is_dead(url: str, dead: Mapping[str, float], now: float) -> bool:
    t = dead.get(url)
    return t is not None and now - t < DEAD_KEPT_S


def gateways_to_try(
    urls: Sequence[str], dead: Mapping[str, float], now: float, first_attempt: bool
) -> tuple[list[str], list[str]]:
    """(the gateways a request tries, in the route's order; those it skips). On a first attempt the
    gateways found dead within ``DEAD_KEPT_S`` are skipped, unless that would leave none; a later
    attempt tries them all."""
    if not first_attempt:
        return list(urls), []
    alive = [u for u in urls if not is_dead(u, dead, now)]
    if not alive:
        return list(urls), []
    return alive, [u for u in urls if u not in alive]


def central_first(kind: str, fallback: str, heard: Mapping[str, float], now: float) -> bool:
    """After a gateway's failure of ``kind`` on a request's first attempt: ask central for a route
    without it before trying ``fallback`` (a timeout, not a failure that came at once, and a
    fall-back not heard from lately)."""
    last = heard.get(fallback)
    return kind == TIMEOUT and (last is None or now - last >= GATEWAY_HEARD_S)


def prefetch_after(wait: float | None) -> float | None:
    """When a request waiting ``wait`` at a gateway has a route without it asked for ahead (None: a
    wait that is not bounded, the route's last resort)."""
    return None if wait is None else wait * PREFETCH_AT


def standby_fresh(asked: float | None, now: float) -> bool:
    """A route asked for ahead at ``asked`` is still worth using (or waiting on: not asked again)."""
    return asked is not None and now - asked < STANDBY_S


def seen_by_central(dead: Mapping[str, float], named: Sequence[str], asked: float) -> list[str]:
    """The gateways marked dead that a route central answered (asked for at ``asked``) names, and
    that central has therefore heard from since they were found dead."""
    return [u for u in named if u in dead and asked - dead[u] >= CENTRAL_SEES_S]


def replicas_to_ask(
    centrals: Sequence[str], heard: Mapping[str, float], now: float
) -> tuple[list[str], bool]:
    """(central's replicas in the order to ask them, whether to ask them all at once): in turn while
    the first answered within ``HEARD_S``, at once otherwise (and never at once with one replica)."""
    order = list(centrals)
    if len(order) < 2:
        return order, False
    last = heard.get(order[0])
    return order, last is None or now - last >= HEARD_S


def after_race(centrals: Sequence[str], winner: str | None, failed: Sequence[str]) -> list[str]:
    """The replicas' order after asking them at once: the one that answered first, then the others
    in their order, those that failed last."""
    rest = [u for u in centrals if u != winner and u not in failed]
    return ([winner] if winner is not None else []) + rest + [u for u in centrals if u in failed]
