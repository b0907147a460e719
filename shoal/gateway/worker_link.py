"""The gateway's side of the worker link: a thin asyncio adapter around the link's state machine
(``protocol/link.py``), one per dialled-in worker. The state machine decides which message may come
when; the dispatcher (``dispatch.py``) owns the requests; this file moves bytes between the socket
and them, checks a worker's login, and keeps what the status shows about the worker.

Life of a connection: CHALLENGE (a nonce) out; HELLO with an HMAC proof of the cluster secret and the
registration in; WELCOME out and the worker joins its model's pool, or REFUSE with a reason and
close. Then REQUEST frames out; RESULT, ERROR, LOAD, PONG, DRAIN and GOODBYE in. A connection that
closes, breaks the protocol or falls silent for ``dead_after_s`` leaves: the dispatcher sends what it
held to other workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shoal.aio import CoalescingProtocol
from shoal.gateway.dispatch import Dispatcher
from shoal.gateway.logins import LoginGuard
from shoal.gateway.pool import ModelPool, ModelTable, Pending, RequestFailed
from shoal.protocol.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    MsgType,
)
from shoal.protocol.interface import ModelInterface
from shoal.protocol.joined import join_requests, plan_joins, split_results
from shoal.protocol.link import (
    Cancel,
    Challenge,
    Drain,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    LinkConnection,
    LinkError,
    Load,
    LocalLinkError,
    Peers,
    Ping,
    Pong,
    Refuse,
    Result,
    Results,
    Role,
    State,
    Welcome,
)
from shoal.protocol.names import check_name
from shoal.protocol.ports import foreign_protocol
from shoal.security.tokens import check_login_proof, new_nonce

log = logging.getLogger("shoal.gateway")

HANDSHAKE_TIMEOUT_S = 5.0
MAX_CAPACITY = 100_000
MIN_WORKER_FRAME = 1024 * 1024  # a worker that accepts less than this cannot take useful requests
DEPARTED_KEPT = 100


@dataclass
class LinkSite:
    """What a worker connection needs of its gateway, and nothing more."""

    name: str
    secret: bytes
    models: ModelTable
    dispatcher: Dispatcher
    logins: LoginGuard
    observe_result: Callable[[ModelInterface, Result, Any], None]
    heartbeat_s: float = 1.0
    dead_after_s: float = 5.0
    # Silent this long (a worker sends LOAD every heartbeat): it may be cut off without its socket
    # closing, so what it holds goes to other workers now; it is dropped after ``dead_after_s``.
    silent_after_s: float = 1.5
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    gateway_id: str = ""  # this gateway among its cluster's
    fronts: str = ""  # where devices go instead, told to one that dials the worker link
    peers: list[str] = field(
        default_factory=list
    )  # worker addresses of the cluster's gateways, this one's too
    connections: set[WorkerConnection] = field(default_factory=set)
    departed: list[dict[str, Any]] = field(default_factory=list)  # workers that left, newest last


class WorkerConnection(CoalescingProtocol):
    def __init__(self, site: LinkSite) -> None:
        super().__init__()
        self.site = site
        self.link = LinkConnection(Role.GATEWAY, site.max_frame_size)
        self.heartbeat_clock = Heartbeat(site.dead_after_s, time.monotonic())
        self.peer = "?"
        self.peer_host = "?"
        self.nonce = new_nonce()
        self.worker_id = ""
        self.pool: ModelPool | None = None
        # What the dispatcher reads and writes (the WorkerHandle protocol).
        self.in_flight = 0
        self.capacity = 1
        self.size = 1  # its whole capacity (``capacity`` is this gateway's share of it)
        self.latency_ewma_ms = 0.0
        self.accepting = False
        self.max_frame_size = DEFAULT_MAX_FRAME_SIZE  # the largest frame this worker accepts
        # Requests that arrive together are joined into one REQUESTS frame when the link allows
        # those (the machine negotiated ``joined``) and the worker batches: at most its batch size.
        self.join_rows = 0
        self._joinable: list[Pending] = []
        self.shares = False  # it divides its capacity between gateways: LOAD says this one's share
        self.cancels = False  # it takes CANCEL (its HELLO said so)
        # What the status and the autoscaler read.
        self.load: dict[str, Any] = {}
        self.info: dict[str, Any] = {}
        self.served = 0
        self.connected_at = time.time()
        self.joined_at = time.monotonic()
        self.draining_since: float | None = None
        self.cpu_rate = 0.0  # fraction of a core the worker's process used recently (from LOAD)
        self._cpu: tuple[float, float] | None = None  # (when, cpu_s) of the last LOAD
        self._gone = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.silent = False  # fell silent: what it held went elsewhere, it gets nothing new
        self._pinged_at = 0.0

    # ----------------------------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        pn = transport.get_extra_info("peername")
        self.peer = f"{pn[0]}:{pn[1]}" if isinstance(pn, tuple) else str(pn)
        self.peer_host = str(pn[0]) if isinstance(pn, tuple) else str(pn)
        self.site.connections.add(self)
        self.site.logins.admit(self)
        challenge = Challenge(list(SUPPORTED_VERSIONS), self.nonce, self.site.name, self.site.gateway_id)
        self.send(self.link.send(challenge))
        self._handshake_timer = self._loop.call_later(HANDSHAKE_TIMEOUT_S, self._handshake_expired)

    def _handshake_expired(self) -> None:
        if self.link.state is State.HANDSHAKE:
            self.site.logins.silent(self)
            self._refuse(f"no HELLO within {HANDSHAKE_TIMEOUT_S:.0f} s", quiet=True)

    def evict(self) -> None:
        """The login guard needs this stranger's slot for a newcomer."""
        self._refuse("too many connections logging in at once; this one waited longest", quiet=True)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.heartbeat_clock.seen(now)
        if self.silent:
            self._heard(now)
        if self.link.state is State.HANDSHAKE and (spoke := foreign_protocol(data[:16])) is not None:
            self._wrong_port(spoke)
            return
        try:
            messages = self.link.receive_data(data)
        except LinkError as e:
            if self.pool is None:  # a stranger: a failed login, throttled and logged once per run
                self._refuse(str(e))
            else:
                self._drop(str(e))
            return
        for msg, payload in messages:
            if isinstance(msg, Result):
                self._on_result(msg, payload, now)
            elif isinstance(msg, Results):
                self._on_results(msg, payload, now)
            elif isinstance(msg, Error):
                self._on_error(msg, now)
            elif isinstance(msg, Load):
                self._on_load(msg, now)
            elif isinstance(msg, Pong):
                pass
            elif isinstance(msg, Hello):
                self._on_hello(msg, now)
                if self.link.state is not State.READY:
                    return
            elif isinstance(msg, Drain):
                if self.pool is not None and self.draining_since is None:
                    log.info("worker %s (%s) is draining", self.worker_id, self.peer)
                    self.draining_since = now
                    self.site.dispatcher.worker_stopped_taking(self.pool, self, now)
            elif isinstance(msg, Goodbye):
                self._drop("worker said goodbye", quiet=True)
                return

    def _wrong_port(self, spoke: str) -> None:
        """A device's client at the worker link: told (in its protocol where that is HTTP/1) and
        logged where the gateway's ports are, then closed."""
        text = f"this is shoal's worker link port; {self.site.fronts or 'devices use the other ports'}\n"
        log.warning("%s client %s dialled the worker link port: %s", spoke, self.peer, text.strip())
        self.site.logins.left(self)
        if spoke == "HTTP/1" and self.transport is not None:
            body = text.encode()
            head = b"HTTP/1.1 421 Misdirected Request\r\ncontent-type: text/plain\r\nconnection: close\r\n"
            self.send([head, b"content-length: %d\r\n\r\n" % len(body), body])
            self.flush()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.connection_lost()
        self._teardown("connection closed" if exc is None else f"connection lost: {exc}")

    # ------------------------------------------------------------------------------ handshake

    def _on_hello(self, h: Hello, now: float) -> None:
        wait = self.site.logins.retry_after(self.peer_host)
        if wait > 0:
            self._refuse(f"too many failed logins from {self.peer_host}; retry in {wait:.1f} s", wait)
            return
        if h.protocol not in SUPPORTED_VERSIONS:
            self._refuse(
                f"protocol version {h.protocol!r} not supported (gateway speaks {list(SUPPORTED_VERSIONS)})"
            )
            return
        if not h.worker_id or len(h.worker_id) > 200:
            self._refuse("HELLO needs a worker_id")
            return
        if not h.model or not h.model_version:
            self._refuse("HELLO needs a model and a model_version")
            return
        if not check_login_proof(self.site.secret, self.nonce, h.worker_id, h.proof):
            self._refuse("login failed: wrong cluster secret")
            return
        try:
            if not 1 <= h.capacity <= MAX_CAPACITY:
                raise ValueError(f"capacity {h.capacity} outside [1, {MAX_CAPACITY}]")
            max_frame = h.max_frame_size or DEFAULT_MAX_FRAME_SIZE
            if max_frame < MIN_WORKER_FRAME:
                raise ValueError(f"max_frame_size {max_frame} below {MIN_WORKER_FRAME}")
            check_name(h.model)
            check_name(h.model_version, "model version")
            spec = h.interface()
            pool = self.site.models.pool_for_worker(spec)
        except ValueError as e:
            self._refuse(f"bad registration: {e}", failed_login=False)
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.site.logins.logged_in(self)
        self.worker_id = h.worker_id
        self.capacity = self.size = h.capacity
        self.max_frame_size = max_frame
        self.join_rows = h.max_batch_size
        self.shares = h.shares
        self.cancels = h.cancels
        self.info = {
            "model": h.model,
            "model_version": h.model_version,
            "runtime": h.runtime,
            "device": h.device,
            "max_batch_size": h.max_batch_size,
            "batch_delay_ms": h.batch_delay_ms,
            "pid": h.pid,
            "host": h.host,
        }
        self.joined_at = now
        s = self.site
        welcome = Welcome(PROTOCOL_VERSION, s.name, s.heartbeat_s, s.dead_after_s, s.max_frame_size)
        self.send(self.link.send(welcome))
        if s.peers:
            self.send(self.link.send(Peers(list(s.peers))))
        self.pool = pool
        log.info(
            "worker %s joined from %s: %s v%s on %s, capacity %d",
            h.worker_id,
            self.peer,
            spec.name,
            spec.version,
            h.device,
            h.capacity,
        )
        s.dispatcher.worker_joined(pool, self, now)

    def _refuse(
        self, reason: str, retry_after: float | None = None, failed_login: bool = True, quiet: bool = False
    ) -> None:
        """Refuse the login and close. Refusals before a valid proof count as failed logins of the
        peer's address (throttled, and logged once per run of failures instead of once each);
        ``quiet`` ones (a stranger closed for its slot, or silent too long) are the guard's to count."""
        if quiet:
            self.site.logins.left(self)  # its slot is free now, not when the close is seen
        elif failed_login:
            self.site.logins.failed(self, reason)
        else:
            self.site.logins.left(self)
            log.warning("refused worker connection from %s: %s", self.peer, reason)
        msg = Refuse(reason, max(0.1, round(retry_after, 1)) if retry_after is not None else None)
        self.send(self.link.send(msg))
        self.flush()
        if self.transport is not None:
            self.transport.close()

    # ---------------------------------------------------------------------------- requests

    def send_request(self, p: Pending) -> None:
        """The dispatcher's way to send a request. One that can be joined waits for the end of this
        event-loop turn, when the requests that came with it go in as few frames as they fit."""
        if p.join_key is None or not self.join_rows or not self.link.joined:
            self.send(p.frame)  # encoded once, when it arrived
            return
        self._joinable.append(p)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def send(self, parts: list[Any]) -> None:
        if self._joinable:  # what was sent before goes before
            self._out.extend(self._joined_frames())
        super().send(parts)

    def flush(self) -> None:
        if self._joinable:
            self._out.extend(self._joined_frames())
        super().flush()

    def _joined_frames(self) -> list[Any]:
        queued, self._joinable = self._joinable, []
        sizes = [(p.join_key, p.rows, p.size) for p in queued]
        plan = plan_joins(sizes, self.join_rows, self.max_frame_size - 65536)
        # Not once a DRAIN crossed them or the link closed: then one frame each, as encoded on arrival.
        may_join = self.link.may_send(MsgType.REQUESTS)
        out: list[Any] = []
        for run in plan:
            if len(run) > 1 and may_join:
                group = [queued[i] for i in run]
                parts = [(p.id, p.header.inputs, p.bufs, p.rows, p.header.rid) for p in group]
                header, bufs = join_requests(parts, group[0].header.outputs)
                try:
                    out.extend(self.link.send(header, bufs))
                    continue
                except LocalLinkError:  # a header too large to join (long request ids): one frame each
                    pass
            for i in run:
                out.extend(queued[i].frame)
        return out

    def _on_result(self, r: Result, payload: bytes | memoryview, now: float) -> None:
        p = self.site.dispatcher.on_result(self, r.id, (r, payload), r.compute_ms, r.batch, now)
        if p is not None:
            self.served += 1
            assert self.pool is not None
            self.site.observe_result(self.pool.spec, r, p)

    def _on_results(self, r: Results, payload: bytes | memoryview, now: float) -> None:
        """A joined answer: each request gets its rows, as if answered alone."""
        try:
            parts = split_results(r, payload)
        except ValueError as e:  # JoinError, or a shape that is no shape
            failed = RequestFailed(f"worker {self.worker_id} sent a malformed result: {e}", 502)
            for i in r.ids:
                self.site.dispatcher.on_failed(self, i, failed, now)
            return
        for result, body in parts:
            self._on_result(result, body, now)

    def _on_error(self, e: Error, now: float) -> None:
        if e.status == 503:  # the worker turned it away (draining, full): another worker may take it
            self.site.dispatcher.on_refused(self, e.id, e.error, now)
            return
        status = e.status if 400 <= e.status < 600 else 500
        self.site.dispatcher.on_failed(
            self, e.id, RequestFailed(f"worker {self.worker_id}: {e.error}", status), now
        )

    def _on_load(self, m: Load, now: float) -> None:
        """A load report: kept for the status, and the worker's CPU use turned into a rate (the
        fraction of one core its process used since the previous report) for the autoscaler."""
        if m.cpu_s is not None:
            if self._cpu is not None and now > self._cpu[0] and m.cpu_s >= self._cpu[1]:
                self.cpu_rate = (m.cpu_s - self._cpu[1]) / (now - self._cpu[0])
            self._cpu = (now, m.cpu_s)
        self.load = {f: getattr(m, f) for f in m.__struct_fields__}
        if self.shares and self.pool is not None and self.accepting and m.capacity != self.capacity:
            self.site.dispatcher.worker_capacity(self.pool, self, max(1, min(m.capacity, MAX_CAPACITY)), now)

    def cancel(self, rid: int) -> None:
        """A request this worker holds whose client left: a worker that takes CANCEL drops it unless
        it is running (answering ERROR 499, which frees its place here)."""
        if not self.cancels or self.link.state not in (State.READY, State.DRAINING):
            return
        if self._joinable:  # requests handed over before leave before it, joined
            self._out.extend(self._joined_frames())
        self.send(self.link.send(Cancel([rid])))

    def drain(self) -> None:
        """Ask this worker to leave: nothing new is sent to it from now; it finishes what it holds,
        says goodbye and exits (the autoscaler's scale-in, and model unloading)."""
        if self.link.state is not State.READY or self.pool is None:
            return
        now = time.monotonic()
        self.draining_since = now
        if self._joinable:  # requests handed over before the DRAIN leave before it, joined
            self._out.extend(self._joined_frames())
        self.send(self.link.send(Drain()))
        log.info("draining worker %s (%s)", self.worker_id, self.peer)
        self.site.dispatcher.worker_stopped_taking(self.pool, self, now)

    # ------------------------------------------------------------------------------ liveness

    def heartbeat(self, now: float) -> None:
        """Checked several times a heartbeat: a PING every heartbeat; silent for ``silent_after_s``:
        what it holds goes elsewhere; for ``dead_after_s``: dropped."""
        if self.link.state not in (State.READY, State.DRAINING):
            return
        quiet = self.heartbeat_clock.silent_for(now)
        if self.heartbeat_clock.dead(now):
            self._drop(f"silent for {quiet:.1f} s")
            return
        # A draining worker is checked too: its machine may be lost while it finishes what it holds.
        holds = self.accepting or (self.draining_since is not None and self.in_flight > 0)
        if quiet > self.site.silent_after_s and not self.silent and holds and self.pool is not None:
            self.silent = True
            held = self.site.dispatcher.worker_silent(
                self.pool, self, f"worker {self.worker_id} fell silent", now
            )
            log.warning(
                "worker %s (%s) silent for %.1f s: %d requests it held sent to other workers; nothing new "
                "goes to it until it speaks",
                self.worker_id,
                self.peer,
                quiet,
                held,
            )
        if now - self._pinged_at >= self.site.heartbeat_s:
            self._pinged_at = now
            self.send(self.link.send(Ping(time.time())))

    def _heard(self, now: float) -> None:
        self.silent = False
        if self.pool is not None and self.link.state is State.READY and self.draining_since is None:
            log.info("worker %s (%s) speaks again: it takes requests again", self.worker_id, self.peer)
            self.site.dispatcher.worker_heard(self.pool, self, now)

    def _drop(self, reason: str, quiet: bool = False) -> None:
        if not quiet:
            log.warning("dropping worker %s (%s): %s", self.worker_id or "?", self.peer, reason)
        self.link.close()
        if self.transport is not None:
            self.transport.abort()
        self._teardown(reason)

    def _teardown(self, reason: str) -> None:
        if self._gone:
            return
        self._gone = True
        self.site.logins.left(self)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.site.connections.discard(self)
        if self.pool is None:
            return
        held = self.site.dispatcher.worker_left(self.pool, self, reason, time.monotonic())
        if held:
            log.warning(
                "worker %s left with %d requests in flight (%s); sending them to other workers",
                self.worker_id,
                held,
                reason,
            )
        else:
            log.info("worker %s left (%s)", self.worker_id, reason)
        self.site.departed.append({**self.describe(), "left": reason, "left_at": time.time()})
        del self.site.departed[:-DEPARTED_KEPT]

    def describe(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "peer": self.peer,
            **self.info,
            "capacity": self.capacity,
            "in_flight": self.in_flight,
            "accepting": self.accepting,
            "latency_ms": round(self.latency_ewma_ms, 3),
            "served": self.served,
            "load": self.load,
        }


def announce_peers(site: LinkSite, addresses: list[str]) -> bool:
    """The cluster's gateways, as this one knows them now: every logged-in worker is told when the
    set changes (it links to those it lacks). True when it changed."""
    peers = sorted(set(addresses))
    if peers == site.peers:
        return False
    site.peers = peers
    for c in list(site.connections):
        if c.pool is not None and c.link.may_send(MsgType.PEERS):
            c.send(c.link.send(Peers(peers)))
    return True
