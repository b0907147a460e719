"""The device client's rules, free of I/O: what to ask whom, what an answer means, when to retry,
where to fail over. Written once; ``device.py`` runs them with a blocking and an asyncio driver.

Each operation (``route``, ``infer``, ``commands``, ``ack``) is a generator that yields what it needs
done, a ``Call`` (one HTTP exchange) or a ``Sleep``, and is sent back a ``Reply`` for a ``Call`` (or
has ``Unreachable`` thrown in when the exchange failed); its return value is the operation's result.
So the rules are tested by feeding replies to a generator (tests/test_client_core.py), no sockets.

Rules:

* A route (a cluster's gateway URLs, least loaded first, and a token signed for that cluster) is
  cached per model and version and renewed shortly before its token expires.
* A gateway cannot be reached (refused, reset, cut off mid-request, timed out) or answers 502/503
  (going away, saturated, its workers gone): send the same request, with the same token and request
  id, to the route's next gateway at once; central is not asked. A gateway found dead (nothing
  connected, or reset before it answered; a silent one whose liveness probe then failed) is skipped
  on first attempts for a while (``failover.py``). A gateway that failed while another
  answered goes to the end of the cached route's list. Either way the route is asked for again
  ``RENEW_AFTER_FAILURE_S`` later (off the request path), as is one central gave without a cluster
  or gateway that failed, or without a gateway of the cluster an earlier route named (for up to
  ``MISSING_KEPT_S``): what failed may have healed, and the route has it back as a fall-back.
* Every gateway of the route failed, or one answered 504: ask central for another route, excluding
  that cluster, and send again (at most ``retries`` times, with back-off doubling from 50 ms: the six
  retries of the default span the three seconds central takes to drop a dead cluster).
* The cluster answers 401 (token expired or the cluster's key rotated): ask central for a fresh route.
* Central's replicas are asked in turn, each but the last for a bounded time, while the first
  answered lately; otherwise all at once, the first answer winning (``failover.replicas_to_ask``).
  One that did not answer is asked last from then on.
* Central cannot be reached: keep using the last route it gave for the model (until its token
  expires), even one whose cluster just failed, retrying it with back-off: a cluster that restarts
  while central is down is back in a second, and it is the only route there is.
* Central has no route yet (404 "no live cluster", or 503 right after central or a cluster starts):
  ask again with back-off for the same few seconds, then give up with central's message.
* Any other 4xx is the device's own mistake: raised at once with the cluster's message.
* Central hands a device cookie (``Shoal-Device-Cookie``) after each full password check; the client
  keeps the latest and sends it to central with its password, so a client that logged in before is
  let in while someone guesses its password (docs/security.md).

Images (PNG/JPEG bytes) are sent as they are and decoded in the cluster; tensors travel with the
binary tensor extension, compressed with zstd when larger than ``compress_above`` bytes. Each request
carries an ``X-Request-Id`` (the caller's, else a new one) that stays the same on every retry and
fail-over, so the gateways' logs and stored results show a retried request as one.

Traces: a request's W3C ``traceparent`` (the caller's header) goes to central with each route call the
request makes, and to the gateway with the request. When the request asked central for its route and
central traced it, central's answer carries the route span's ``traceparent``: a request without one
of its own goes on with it, to central's later route calls and to the gateway, so its trace holds the
route and the inference. Only that request: a cached route serves later requests, which must not
join the trace of the one that fetched it.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import msgspec
import numpy as np

from shoal.client import failover
from shoal.protocol.central_messages import MAX_EXCLUDED, RouteAnswer
from shoal.protocol.compression import compress
from shoal.protocol.oip import build_infer_request, parse_infer_response

RETRY_STATUSES = (502, 503, 504)
# Answers after which the same request goes to the route's next gateway: the gateway is going away or
# saturated, or its workers failed the request; another gateway of the cluster may well serve it.
NEXT_GATEWAY_STATUSES = (502, 503)
REQUEST_ID_HEADER = "X-Request-Id"
TIMEOUT_HEADER = "X-Request-Timeout-Ms"
MAX_RATE_LIMIT_WAIT_S = 60.0  # the longest wait a 429's Retry-After is honoured for
COOKIE_HEADER = "Shoal-Device-Cookie"
TRACEPARENT_HEADER = "traceparent"  # W3C Trace Context
RENEW_BEFORE_S = 10.0
# A request to a gateway that has another behind it in the route, or on its first attempt, waits at
# most this long (or ten times the model's recent latency, if longer) before it goes to the next
# gateway or asks central: a gateway whose machine vanished answers nothing, and its connections
# never close.
NEXT_GATEWAY_AFTER_S = 2.0
# A route one of whose gateways failed is asked for again this long after: central then orders the
# cluster's gateways by load again, a gateway that came back included (else it would stay last until
# the token expired).
RENEW_AFTER_FAILURE_S = 10.0
# A gateway of the cluster that a route named and central's next route for it leaves out (it was
# down when central answered) keeps the route due again every RENEW_AFTER_FAILURE_S for this long,
# so the route gets it back, as a fall-back, once it heals.
MISSING_KEPT_S = 300.0
# A request that needs a route another request of the same client is asking central for looks for
# that answer this often.
SHARED_POLL_S = 0.02


class InferError(Exception):
    """The cluster answered with an error; ``status`` is the HTTP status, ``retry_after`` its hint."""

    def __init__(self, message: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class RouteError(Exception):
    """No route: central refused, knows no cluster for the model, or cannot be reached (status None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        """Worth asking again shortly: central unreachable, no live cluster yet, or overloaded."""
        return self.status in (None, 404, 502, 503, 504)


class Unreachable(OSError):
    """The peer could not be reached, or the exchange broke off (refused, reset, timed out, TLS).
    ``kind`` says which (``failover.REFUSED``, ``CONNECT_TIMEOUT``, ``RESET``, ``TIMEOUT``; "" when
    not known)."""

    def __init__(self, *args: object, kind: str = "") -> None:
        super().__init__(*args)
        self.kind = kind


# ----------------------------------------------------------------------------- what flows yield


@dataclass(frozen=True)
class Call:
    """One HTTP exchange for the driver to make."""

    method: str
    url: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None  # None: the client's own
    # Still unanswered after ``slow_after`` seconds: the driver calls ``on_slow`` (and then runs what
    # the client has for the background); a driver that cannot watch a call as it runs may ignore it.
    slow_after: float | None = None
    on_slow: Callable[[], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Race:
    """Exchanges for the driver to make at once: the outcome sent back is a list with, for each call,
    its ``Reply`` (the first one that came; the driver stops there), the ``Unreachable`` it failed with
    before that, or None (still under way when another answered: abandoned). Each failed: a list of
    ``Unreachable`` only."""

    calls: tuple[Call, ...]


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Compute:
    """Work for the device's own processor (a local model, encoding a frame): the driver runs ``fn``
    (inline when blocking, in a thread under asyncio) and sends its return value back."""

    fn: Callable[[], Any]


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]  # names in lower case
    data: bytes


T = TypeVar("T")
Flow = Generator["Call | Race | Sleep | Compute", Any, T]


@dataclass(frozen=True)
class Finished:
    value: Any


def resume(flow: Flow[Any], outcome: Any) -> Call | Race | Sleep | Compute | Finished:
    """Hand a flow the outcome of its last step (nothing to start it or after a sleep, the reply to
    a call, the failure of a call, raised inside it, or what a ``Compute`` returned); its next step,
    or ``Finished``."""
    try:
        if isinstance(outcome, Unreachable):
            return flow.throw(outcome)
        return flow.send(outcome)
    except StopIteration as done:
        return Finished(done.value)


# ------------------------------------------------------------------------------------ results


@dataclass
class Route:
    cluster: str
    url: str
    token: str
    expires_at: float
    model: str
    version: str | None
    latency_ms: float | None = None  # the cluster's recent latency for the model, when central says it
    fallbacks: list[str] = field(default_factory=list)  # the cluster's other gateways, in the order to try
    renew_at: float = float("inf")  # asked for again from then on (a gateway of it failed: it may heal)
    missing: dict[str, float] = field(default_factory=dict)  # gateways earlier routes named: since when

    @property
    def urls(self) -> list[str]:
        """The gateways to send a request to, in turn."""
        return [self.url, *self.fallbacks]

    def demote(self, failed: list[str]) -> None:
        """Move gateways that just failed (while another answered) to the end, keeping the order."""
        urls = self.urls
        order = [u for u in urls if u not in failed] + [u for u in urls if u in failed]
        self.url, self.fallbacks = order[0], order[1:]


@dataclass
class InferResult:
    outputs: dict[str, np.ndarray]
    model: str
    version: str
    cluster: str
    latency_ms: float
    labels: dict[str, list[str]] = field(default_factory=dict)
    # Where it was computed ("remote", "local", "split"), under which policy, what went up to the
    # cluster (request body bytes), how long each part took (ms), and why the policy's own choice was
    # not followed (the link down, the budget), if it was not.
    where: str = "remote"
    policy: str = "remote"
    bytes_up: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    fallback: str | None = None
    gateway: str = ""  # the URL of the gateway that answered

    def label(self, output: str | None = None, row: int = 0) -> str | int:
        """The top class of an output (its label when the model has labels, else its index)."""
        name = output or next(iter(self.outputs))
        scores = self.outputs[name].reshape(self.outputs[name].shape[0], -1)[row]
        i = int(np.argmax(scores))
        names = self.labels.get(name)
        return names[i] if names and i < len(names) else i

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "cluster": self.cluster,
            "latency_ms": round(self.latency_ms, 2),
            "where": self.where,
            "policy": self.policy,
            "bytes_up": self.bytes_up,
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }
        if self.fallback:
            d["fallback"] = self.fallback
        d["labels"] = {k: self.label(k) for k in self.outputs if k in self.labels}
        d["outputs"] = {k: v.tolist() for k, v in self.outputs.items()}
        return d


def error_message(data: bytes) -> str:
    """The ``error`` of a JSON error answer, else the start of the body."""
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode("utf-8", "replace")


def model_path(model: str, version: str | None) -> str:
    p = f"/v2/models/{quote(model, safe='')}"
    return p + (f"/versions/{quote(version, safe='')}" if version else "")


def _seconds(header: str | None) -> float:
    """A ``Retry-After`` of seconds; anything else (an HTTP date, "²", "nan", junk) counts as none."""
    try:
        s = float(header) if header and header.isascii() else 0.0
    except ValueError:
        return 0.0
    return s if 0.0 <= s < float("inf") else 0.0


def new_request_id() -> str:
    """An id for one inference request, the same on each of its retries (``X-Request-Id``)."""
    return uuid.uuid4().hex


def backoff(attempt: int, retry_after: str | None, retry_after_ms: str | None = None) -> float:
    """Seconds before attempt ``attempt + 1``: doubling from 50 ms to 2 s, or the server's hint
    (``Retry-After-Ms`` where it sent one, else ``Retry-After``)."""
    hint = 0.0
    if attempt:
        ms = _seconds(retry_after_ms)
        hint = ms / 1000.0 if ms else _seconds(retry_after)
    return min(2.0, max(hint, 0.05 * (2**attempt)))


class ClientCore:
    """The state both clients keep (routes, labels) and the flows that use it."""

    def __init__(
        self,
        central: str | list[str],
        device: str,
        password: str,
        retries: int = 6,
        compress_above: int = 4096,
        clock: Any = time.time,
        timeout: float | None = None,  # the driver's own per request, if it has one
    ) -> None:
        self.timeout = timeout
        self.centrals = [u.rstrip("/") for u in ([central] if isinstance(central, str) else list(central))]
        if not self.centrals:
            raise ValueError("give at least one central URL")
        self.auth = "Basic " + base64.b64encode(f"{device}:{password}".encode()).decode()
        self.device = device
        self.retries = retries
        self.compress_above = compress_above
        self.clock = clock
        self.routes: dict[tuple[str, str | None], Route] = {}
        self.last_routes: dict[tuple[str, str | None], Route] = {}  # kept after a failure, for outages
        self.labels: dict[tuple[str, str, str], dict[str, list[str]]] = {}  # (cluster, model, version)
        self.cookie: str | None = None  # central's device cookie: this client logged in before
        self.due: set[tuple[str, str | None]] = set()  # routes to ask central for again (``renew``)
        self.dead: dict[str, float] = {}  # gateway URL -> when it was found dead (``failover.py``)
        self.to_probe: set[str] = set()  # silent gateways whose liveness to probe (``probe``)
        self.probing: set[str] = set()  # ... and those being probed
        self.heard: dict[str, float] = {}  # central replica URL -> when it last answered
        self.gateway_heard: dict[str, float] = {}  # gateway URL -> when it last answered
        self.asking: set[tuple[str, str | None]] = set()  # routes a request is asking central for
        # Routes without a gateway a request waits on, asked for ahead: (model, version, gateway) ->
        # when asked for, and the route once central answered (``failover.PREFETCH_AT``).
        self.prefetched: dict[tuple[str, str | None, str], float] = {}
        self.standby: dict[tuple[str, str | None, str], Route] = {}
        self.to_prefetch: set[tuple[str, str | None, str]] = set()

    def background(self) -> list[Flow[None]]:
        """What the driver runs beside the requests (no request waits for it): routes due to be asked
        for again (``renewals``), liveness probes of gateways that fell silent (``probes``)."""
        return [*self.renewals(), *self.probes(), *self.prefetches()]

    def prefetches(self) -> list[Flow[None]]:
        flows: list[Flow[None]] = []
        while self.to_prefetch:
            flows.append(self.prefetch(*self.to_prefetch.pop()))
        return flows

    def _slow(self, r: Route, url: str) -> None:
        """A request is still unanswered at ``url`` halfway through its bounded wait: a route without
        it, asked for ahead (once per gateway per ``failover.STANDBY_S``)."""
        key = (r.model, r.version, url)
        if not failover.standby_fresh(self.prefetched.get(key), self.clock()):
            self.prefetched[key] = self.clock()
            self.to_prefetch.add(key)

    def prefetch(self, model: str, version: str | None, url: str) -> Flow[None]:
        """Ask central (a bounded wait) for a route without gateway ``url``, kept apart until a
        request fails there (``standby``)."""
        try:
            r, _ = yield from self._ask_central(model, version, set(), {url}, bounded=True, keep=False)
        except RouteError:
            return  # central unreachable and no route cached: the request finds out for itself
        if url not in r.urls:
            self.standby[(model, version, url)] = r

    def renewals(self) -> list[Flow[None]]:
        flows: list[Flow[None]] = []
        while self.due:
            flows.append(self.renew(*self.due.pop()))
        return flows

    def probes(self) -> list[Flow[None]]:
        flows: list[Flow[None]] = []
        while self.to_probe:
            url = self.to_probe.pop()
            self.probing.add(url)
            flows.append(self.probe(url))
        return flows

    def probe(self, url: str) -> Flow[None]:
        """Is a gateway that answered nothing in time there at all? Its liveness, within
        ``failover.PROBE_TIMEOUT_S``: any answer finds it alive, any failure dead."""
        try:
            yield Call("GET", url + "/v2/health/live", None, {}, failover.PROBE_TIMEOUT_S)
        except Unreachable:
            self.dead[url] = self.clock()
        else:
            self.dead.pop(url, None)
            self.gateway_heard[url] = self.clock()
        finally:
            self.probing.discard(url)

    def _gateway_failed(self, url: str, e: Unreachable) -> None:
        """Dead when the failure says so; silent, its liveness probed, otherwise."""
        now = self.clock()
        if failover.found_dead(e.kind):
            self.dead[url] = now
        elif failover.needs_probe(e.kind, url, self.dead, self.probing, now):
            self.to_probe.add(url)

    def _central_headers(self, json_body: bool = True) -> dict[str, str]:
        headers = {"Authorization": self.auth}
        if json_body:
            headers["Content-Type"] = "application/json"
        if self.cookie:
            headers[COOKIE_HEADER] = self.cookie
        return headers

    def _keep_cookie(self, reply: Reply) -> None:
        cookie = reply.headers.get(COOKIE_HEADER.lower())
        if cookie:  # only after a correct password, whatever the answer (a 404 "no cluster" too)
            self.cookie = cookie

    # ---------------------------------------------------------------------------------- routes

    def route(
        self,
        model: str,
        version: str | None = None,
        exclude: set[str] | None = None,
        avoid: set[str] | None = None,
    ) -> Flow[Route]:
        """A route for the model: cached, else from central (each replica in turn), else, while
        central cannot be reached, the last one it gave. ``exclude``: clusters that failed;
        ``avoid``: gateways that could not be reached (central names their clusters' others). While
        another request of this client asks central for the same route (the requests in flight at a
        gateway that was lost fail together), this one waits for that answer rather than ask too."""
        r, _ = yield from self.traced_route(model, version, exclude, avoid)
        return r

    def traced_route(
        self,
        model: str,
        version: str | None = None,
        exclude: set[str] | None = None,
        avoid: set[str] | None = None,
        traceparent: str | None = None,
    ) -> Flow[tuple[Route, str | None]]:
        """``route``, sending ``traceparent`` to central if it is asked; with the ``traceparent`` of
        central's span of the route when central was asked and traced it (for the request that
        asked, never kept with the route), else None."""
        exclude = exclude or set()
        avoid = avoid or set()
        key = (model, version)
        for _ in range(int((self.timeout or 10.0) / SHARED_POLL_S)):
            cached = self._usable(key, exclude, avoid)
            if cached is not None or key not in self.asking:
                break
            yield Sleep(SHARED_POLL_S)
        else:
            cached = self._usable(key, exclude, avoid)
        if cached is not None:
            return cached, None
        self.asking.add(key)
        try:
            return (yield from self._ask_central(model, version, exclude, avoid, traceparent=traceparent))
        finally:
            self.asking.discard(key)

    def _usable(self, key: tuple[str, str | None], exclude: set[str], avoid: set[str]) -> Route | None:
        """The cached route, if it is not of a cluster excluded, names a gateway not avoided and is
        not about to expire."""
        cached = self.routes.get(key)
        now = self.clock()
        if (
            cached is None
            or cached.cluster in exclude
            or avoid.issuperset(cached.urls)
            or now >= cached.expires_at - RENEW_BEFORE_S
        ):
            return None
        if now >= cached.renew_at:
            # Due to be asked for again (one of its gateways failed a while ago): off the request
            # path, by the driver (``renew``); requests go on with this one meanwhile.
            cached.renew_at = now + RENEW_AFTER_FAILURE_S
            self.due.add(key)
        return cached

    def renew(self, model: str, version: str | None) -> Flow[None]:
        """Ask central again for a route in use (a driver runs this beside the requests); the route in
        use stays if central does not answer within a bounded wait."""
        self.due.discard((model, version))
        yield from self._ask_central(model, version, set(), set(), bounded=True)

    def _ask_central(
        self,
        model: str,
        version: str | None,
        exclude: set[str],
        avoid: set[str],
        bounded: bool = False,
        keep: bool = True,
        traceparent: str | None = None,
    ) -> Flow[tuple[Route, str | None]]:
        """Central's route (``keep``: cached as the model's route from now on; else only returned),
        and the ``traceparent`` of central's span of it (when central traced it; ``traceparent``:
        the request's own, sent to central)."""
        body: dict[str, Any] = {"model": model}
        if version:
            body["version"] = version
        if exclude:
            body["exclude"] = sorted(exclude)
        if avoid:
            body["avoid"] = sorted(avoid)[:MAX_EXCLUDED]
        last: Exception | None = None
        asked = self.clock()
        replies = yield from self._central_replies("/v1/route", json.dumps(body).encode(), bounded, traceparent)
        for reply in replies:
            if isinstance(reply, Unreachable):
                last = reply
                continue
            self._keep_cookie(reply)
            if reply.status == 404 and (exclude or avoid):  # every cluster failed once: try them all again
                cached = self._usable((model, version), set(), set())
                if cached is not None:
                    return cached, None
                return (yield from self._ask_central(model, version, set(), set(), keep=keep, traceparent=traceparent))
            r, central_trace = self._parse_route(reply, model, version)
            for url in failover.seen_by_central(self.dead, r.urls, asked):
                del self.dead[url]  # central heard from it since it was found dead: back
            now = self.clock()
            old = self.routes.get((model, version)) or self.last_routes.get((model, version))
            if old is not None and old.cluster == r.cluster:  # gateways of it this route leaves out
                gone = {u: t for u, t in old.missing.items() if now - t < MISSING_KEPT_S}
                gone.update({u: now for u in old.urls if u not in gone})
                r.missing = {u: t for u, t in gone.items() if u not in r.urls}
            if exclude or avoid or r.missing:  # given without what failed, which may heal: due again
                r.renew_at = now + RENEW_AFTER_FAILURE_S
            if keep:
                self.routes[(model, version)] = self.last_routes[(model, version)] = r
            yield from self._fetch_labels(r)
            return r, central_trace
        fallback = self.routes.get((model, version)) or self.last_routes.get((model, version))
        if fallback is not None and self.clock() < fallback.expires_at:
            return fallback, None  # central is down: the last route works until its token expires
        raise RouteError(f"no central reachable ({last}) and no usable cached route for '{model}'")

    def _central_replies(
        self, path: str, body: bytes, bounded: bool, traceparent: str | None = None
    ) -> Flow[list[Reply | Unreachable]]:
        """Central's answer to a POST of ``body`` to ``path``: the failures met, then the ``Reply``
        if one came (the caller reads them in that order). In turn, each replica but the last for a
        bounded time (all of them when ``bounded``), while the first answered lately; otherwise all at
        once (``failover.replicas_to_ask``). A replica that did not answer is asked last from then on:
        the bounded wait is paid once, not at every route asked for. ``traceparent``: the request's
        trace, sent along."""
        headers = self._central_headers()
        if traceparent:
            headers[TRACEPARENT_HEADER] = traceparent
        order, at_once = failover.replicas_to_ask(self.centrals, self.heard, self.clock())
        out: list[Reply | Unreachable] = []
        if at_once:
            wait = NEXT_GATEWAY_AFTER_S if bounded else None
            outcomes = yield Race(tuple(Call("POST", u + path, body, headers, wait) for u in order))
            failed = [u for u, o in zip(order, outcomes, strict=True) if isinstance(o, Unreachable)]
            winner = next((u for u, o in zip(order, outcomes, strict=True) if isinstance(o, Reply)), None)
            self.centrals = failover.after_race(self.centrals, winner, failed)
            out = [o for o in outcomes if isinstance(o, Unreachable)]
            if winner is not None:
                self.heard[winner] = self.clock()
                out += [o for o in outcomes if isinstance(o, Reply)]
            return out
        for k, url in enumerate(order):
            # A replica whose machine vanished answers nothing: wait a bounded time while another
            # replica (or a cached route) is there to fall back on.
            wait = NEXT_GATEWAY_AFTER_S if bounded or k < len(order) - 1 else None
            try:
                reply = yield Call("POST", url + path, body, headers, wait)
            except Unreachable as e:
                out.append(e)
                if url in self.centrals:
                    self.centrals.remove(url)
                    self.centrals.append(url)
                continue
            assert reply is not None
            self.heard[url] = self.clock()
            out.append(reply)
            return out
        return out

    @staticmethod
    def _parse_route(reply: Reply, model: str, version: str | None) -> tuple[Route, str | None]:
        """Central's typed answer (``RouteAnswer``), held under the model and version asked for, and
        the ``traceparent`` of central's span of it (when central traced it)."""
        if reply.status != 200:
            raise RouteError(f"central: HTTP {reply.status}: {error_message(reply.data)}", reply.status)
        try:
            a = msgspec.json.decode(reply.data, type=RouteAnswer)
        except msgspec.MsgspecError as e:
            raise RouteError(f"central answered a route this client cannot read: {e}") from None
        latency = a.latency_ms if a.latency_ms > 0 else None  # 0: not known
        url = a.url.rstrip("/")
        fallbacks = list(dict.fromkeys(u.rstrip("/") for u in a.fallbacks if u.rstrip("/") != url))
        trace = a.traceparent if isinstance(a.traceparent, str) else None
        return Route(a.cluster, url, a.token, float(a.expires_at), model, version, latency, fallbacks), trace

    def _fetch_labels(self, r: Route) -> Flow[None]:
        """The model's class labels from the cluster's metadata, for ``InferResult.label``; none on failure."""
        for url in r.urls:
            try:
                auth = {"Authorization": f"Bearer {r.token}"}
                reply = yield Call("GET", url + model_path(r.model, None), None, auth)
            except Unreachable:
                continue
            break
        else:
            return
        assert reply is not None
        if reply.status != 200:
            return
        try:
            meta = json.loads(reply.data)
            labels = (meta.get("parameters") or {}).get("labels") or {}
            for v in meta.get("versions", []):
                self.labels[(r.cluster, r.model, v)] = labels
        except (ValueError, AttributeError, TypeError):
            return

    # ----------------------------------------------------------------------------------- infer

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray] | None = None,
        image: bytes | None = None,
        version: str | None = None,
    ) -> Flow[InferResult]:
        body, headers = self.infer_body(inputs, image)
        return (yield from self.send_infer(model, body, headers, version))

    def send_infer(
        self,
        model: str,
        body: bytes,
        headers: dict[str, str],
        version: str | None = None,
        retries: int | None = None,
    ) -> Flow[InferResult]:
        """Send a request body made by ``infer_body``; ``retries`` overrides the client's (0: one
        attempt, for callers with an answer of their own to fall back on). An attempt tries the
        route's gateways in turn (``Route.urls``) before central is asked for another route."""
        retries = self.retries if retries is None else retries
        path = model_path(model, version) + "/infer"
        if not any(k.lower() == REQUEST_ID_HEADER.lower() for k in headers):
            headers = {**headers, REQUEST_ID_HEADER: new_request_id()}
        # The caller's trace context, else (once central traced a route this request asked for)
        # central's: sent to central with each route call and to the gateway with the request.
        traceparent = next((v for k, v in headers.items() if k.lower() == TRACEPARENT_HEADER), None)
        exclude: set[str] = set()
        avoid: set[str] = set()
        last = ""
        for attempt in range(retries + 1):
            try:
                r, central_trace = yield from self.traced_route(model, version, exclude, avoid, traceparent)
            except RouteError as e:
                if not e.retryable or attempt >= retries:
                    raise
                last = str(e)
                yield Sleep(backoff(attempt, None))
                continue
            if traceparent is None and central_trace is not None:
                traceparent = central_trace
                headers = {**headers, TRACEPARENT_HEADER: central_trace}
            sent = {**headers, "Authorization": f"Bearer {r.token}"}
            failed: list[str] = []
            reply: Reply | None = None
            # A first attempt skips the gateways found dead lately (while another remains): central is
            # asked for a route without them rather than each getting the bounded wait.
            urls, skipped = failover.gateways_to_try(r.urls, self.dead, self.clock(), attempt == 0)
            for k, url in enumerate(urls):
                t0 = time.perf_counter()
                # Bounded while another gateway remains, and on a first attempt (central may know
                # gateways this route does not name); the last gateway of a later attempt gets it all.
                wait = self.next_gateway_after(r) if k < len(urls) - 1 or attempt == 0 else None
                # The gateway is told how long this attempt may take: a request it cannot answer
                # in time is refused at once (503 and when to try again), not queued to time out.
                budget = wait if wait is not None else self.timeout
                call_headers = sent if budget is None else {**sent, TIMEOUT_HEADER: str(max(1, int(budget * 1000)))}
                # Unanswered halfway through a bounded wait: a route without this gateway asked ahead.
                slow = failover.prefetch_after(wait)
                on_slow = (lambda r=r, url=url: self._slow(r, url)) if slow is not None else None
                try:
                    reply = yield Call("POST", url + path, body, call_headers, wait, slow, on_slow)
                except Unreachable as e:
                    reply, last = None, f"cluster {r.cluster} unreachable at {url}: {e}"
                    failed.append(url)
                    r.demote([url])  # this device's other requests try the route's others first now
                    r.renew_at = min(r.renew_at, self.clock() + RENEW_AFTER_FAILURE_S)
                    self._gateway_failed(url, e)
                    standby = self.standby.pop((r.model, r.version, url), None)
                    if standby is not None and failover.standby_fresh(
                        self.prefetched.get((r.model, r.version, url)), self.clock()
                    ):
                        # Central's route without it, asked for while this request waited: go on with it.
                        self.routes[(r.model, r.version)] = self.last_routes[(r.model, r.version)] = standby
                        break
                    if (
                        attempt == 0
                        and k < len(urls) - 1
                        and failover.central_first(e.kind, urls[k + 1], self.gateway_heard, self.clock())
                    ):
                        break  # central, which hears every gateway, before a fall-back not seen lately
                    continue
                assert reply is not None
                self.gateway_heard[url] = self.clock()
                if self.dead:
                    self.dead.pop(url, None)  # it answered: there after all
                if reply.status not in NEXT_GATEWAY_STATUSES:
                    break
                failed.append(url)
            if reply is not None and reply.status == 200:
                if failed:
                    r.demote(failed)
                    r.renew_at = min(r.renew_at, self.clock() + RENEW_AFTER_FAILURE_S)
                result = self._result(r, reply, t0)
                result.bytes_up = len(body)
                result.gateway = url
                return result
            if reply is None:  # no gateway of the route answered: central may know others of the
                # cluster (it leaves these out, and skips a cluster that has no other)
                avoid.update(failed)
                avoid.update(skipped)
                self._drop(r)
                wait = backoff(attempt, None)
            else:
                last, wait = self._failed(r, reply, exclude, attempt)
            if attempt < retries:  # no wait after the last attempt
                yield Sleep(wait)
        raise InferError(f"gave up after {retries + 1} attempts; last: {last}", 503)

    def next_gateway_after(self, r: Route) -> float:
        """How long a request waits at a gateway with another behind it in the route."""
        floor = max(NEXT_GATEWAY_AFTER_S, 10 * (r.latency_ms or 0.0) / 1000.0)
        return min(self.timeout, floor) if self.timeout else floor

    def infer_body(
        self, inputs: dict[str, np.ndarray] | None, image: bytes | None
    ) -> tuple[bytes, dict[str, str]]:
        if image is not None:
            return image, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "0"}
        if not inputs:
            raise ValueError("give inputs (a dict of arrays) or image (encoded bytes)")
        body, hl = build_infer_request(inputs, binary=True, binary_output=True)
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(hl)}
        if self.compress_above and len(body) > self.compress_above:
            body = compress(body, "zstd", level=1)
            headers["Content-Encoding"] = "zstd"
        return body, headers

    def _result(self, route: Route, reply: Reply, t0: float) -> InferResult:
        hl = reply.headers.get("inference-header-content-length")
        doc, outputs = parse_infer_response(reply.data, int(hl) if hl else None)
        version = str(doc.get("model_version", route.version or ""))
        return InferResult(
            outputs,
            str(doc.get("model_name", route.model)),
            version,
            route.cluster,
            (time.perf_counter() - t0) * 1000.0,
            self.labels.get((route.cluster, route.model, version), {}),
        )

    def _failed(self, r: Route, reply: Reply, exclude: set[str], attempt: int) -> tuple[str, float]:
        """After the cluster answered an error: what went wrong and how long to wait before the next
        attempt; ``InferError`` when another attempt would not help (the device's own mistake)."""
        last = f"cluster {r.cluster}: HTTP {reply.status}: {error_message(reply.data)}"
        if reply.status == 401:  # token expired, or the cluster's key changed: a fresh route
            self._drop(r)
            return last, 0.0
        if reply.status == 429:  # over this credential's rate limit: wait as told, then try again
            ms = _seconds(reply.headers.get("retry-after-ms"))
            hint = ms / 1000.0 if ms else _seconds(reply.headers.get("retry-after"))
            return last, min(MAX_RATE_LIMIT_WAIT_S, max(hint, backoff(attempt, None)))
        if reply.status in RETRY_STATUSES:
            self._forget(r, exclude)
            return last, backoff(attempt, reply.headers.get("retry-after"), reply.headers.get("retry-after-ms"))
        raise InferError(last, reply.status)

    def _forget(self, r: Route, exclude: set[str]) -> None:
        exclude.add(r.cluster)
        self._drop(r)

    def _drop(self, r: Route) -> None:
        """Forget the cached route ``r`` (not one another request got from central since)."""
        if self.routes.get((r.model, r.version)) is r:
            del self.routes[(r.model, r.version)]

    # -------------------------------------------------------------------------------- commands

    def commands(self, wait_s: float, timeout: float) -> Flow[list[dict[str, Any]]]:
        """Commands an operator posted for this device (long poll: central waits up to ``wait_s``)."""
        last: Exception | None = None
        for url in self.centrals:
            try:
                reply = yield Call(
                    "GET",
                    f"{url}/v1/commands?wait={wait_s:g}",
                    None,
                    self._central_headers(False),
                    wait_s + timeout,
                )
            except Unreachable as e:
                last = e
                continue
            assert reply is not None
            self._keep_cookie(reply)
            if reply.status != 200:
                raise RouteError(f"central: HTTP {reply.status}: {error_message(reply.data)}", reply.status)
            return list(json.loads(reply.data).get("commands", []))
        raise RouteError(f"no central reachable: {last}")

    def ack(self, command_id: int, result: Any = None) -> Flow[None]:
        """Tell central a command was carried out (with an optional result)."""
        body = json.dumps({"result": result}).encode()
        headers = self._central_headers()
        for url in self.centrals:
            try:
                reply = yield Call("POST", f"{url}/v1/commands/{int(command_id)}/ack", body, headers)
            except Unreachable:
                continue
            assert reply is not None
            self._keep_cookie(reply)
            if reply.status != 200:
                raise RouteError(f"central: HTTP {reply.status}: {error_message(reply.data)}", reply.status)
            return
        raise RouteError("no central reachable to acknowledge the command")
