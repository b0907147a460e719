"""The gateway's side of the worker link: one asyncio protocol per dialled-in worker.

Life of a connection: the gateway sends CHALLENGE (a nonce); the worker answers HELLO with an HMAC
proof of the cluster secret and its registration; the gateway answers WELCOME and adds the worker to
its model's pool, or REFUSE with a reason (logged in one line) and closes. Then REQUEST frames go out,
RESULT / ERROR / LOAD / PONG come back. A connection that closes, breaks the codec or falls silent for
``dead_after_s`` takes its in-flight requests back to the pool, which sends them to another worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from shoal.aio import CoalescingProtocol
from shoal.gateway.pool import ModelPool, ModelSpec, Pending, RequestFailed
from shoal.protocol.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_HEADER_SIZE,
    PREFIX_SIZE,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    FrameDecoder,
    FrameError,
    MsgType,
    encode_frame,
)
from shoal.security.tokens import check_login_proof, new_nonce

if TYPE_CHECKING:
    from shoal.gateway.server import Gateway

log = logging.getLogger("shoal.gateway")

HANDSHAKE_TIMEOUT_S = 5.0
MAX_CAPACITY = 100_000
# Before a peer has logged in, it may send one HELLO: a header-only frame. Buffering more for a peer
# nobody has authenticated would let anyone make the gateway hold the largest frame per connection.
LOGIN_MAX_FRAME = PREFIX_SIZE + MAX_HEADER_SIZE
MIN_WORKER_FRAME = 1024 * 1024  # a worker that accepts less than this cannot take useful requests


class WorkerConnection(CoalescingProtocol):
    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gw = gateway
        self.decoder = FrameDecoder(LOGIN_MAX_FRAME)
        self.peer = "?"
        self.peer_host = "?"
        self.max_frame_size = DEFAULT_MAX_FRAME_SIZE  # the largest frame this worker accepts
        self.nonce = new_nonce()
        self.state = "handshake"
        self.worker_id = ""
        self.pool: ModelPool | None = None
        self.in_flight = 0
        self.capacity = 1
        self.latency_ewma_ms = 0.0
        self.accepting = False
        self.pending: dict[int, Pending] = {}
        self.last_seen = time.monotonic()
        self.load: dict[str, Any] = {}
        self.info: dict[str, Any] = {}
        self.served = 0
        self.connected_at = time.time()
        self.joined_at = time.monotonic()
        self.draining_since: float | None = None
        self.cpu_rate = 0.0  # fraction of a core the worker's process used recently (from LOAD)
        self._load_at = 0.0
        self._handshake_timer: asyncio.TimerHandle | None = None

    # ----------------------------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        pn = transport.get_extra_info("peername")
        self.peer = f"{pn[0]}:{pn[1]}" if isinstance(pn, tuple) else str(pn)
        self.peer_host = str(pn[0]) if isinstance(pn, tuple) else str(pn)
        self.gw.connections.add(self)
        logins = self.gw.logins
        if not logins.admit(self):
            self.state = "closed"
            transport.abort()
            return
        self.send(
            encode_frame(
                MsgType.CHALLENGE,
                {"versions": list(SUPPORTED_VERSIONS), "nonce": self.nonce, "gateway": self.gw.config.name},
            )
        )
        self._handshake_timer = self._loop.call_later(HANDSHAKE_TIMEOUT_S, self._handshake_expired)

    def _handshake_expired(self) -> None:
        if self.state == "handshake":
            self._refuse(f"no HELLO within {HANDSHAKE_TIMEOUT_S:.0f} s")

    def data_received(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        try:
            frames = self.decoder.feed(data)
        except FrameError as e:
            self._drop(f"bad frame: {e}")
            return
        for f in frames:
            if self.state == "handshake":
                self._on_hello(f.type, f.header)
                if self.state != "ready":
                    return
                continue
            t = f.type
            try:
                if t is MsgType.RESULT:
                    self._on_result(f.header, f.payload)
                elif t is MsgType.ERROR:
                    self._on_error(f.header)
                elif t is MsgType.LOAD:
                    self._on_load(f.header)
                elif t is MsgType.PONG:
                    pass
                elif t is MsgType.DRAIN:
                    self.accepting = False
                    log.info("worker %s (%s) is draining", self.worker_id, self.peer)
                elif t is MsgType.GOODBYE:
                    self._drop("worker said goodbye", quiet=True)
                    return
                else:
                    self._drop(f"unexpected {t.name} frame from a worker")
                    return
            except (KeyError, TypeError, ValueError) as e:
                self._drop(f"malformed {t.name} frame: {e}")
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self._teardown("connection closed" if exc is None else f"connection lost: {exc}")

    # ------------------------------------------------------------------------------ handshake

    def _on_hello(self, t: MsgType, h: dict[str, Any]) -> None:
        wait = self.gw.logins.retry_after(self.peer_host)
        if wait > 0:
            self._refuse(f"too many failed logins from {self.peer_host}; retry in {wait:.0f} s", wait)
            return
        if t is not MsgType.HELLO:
            self._refuse(f"expected HELLO, got {t.name}")
            return
        v = h.get("protocol")
        if v not in SUPPORTED_VERSIONS:
            self._refuse(f"protocol version {v!r} not supported (gateway speaks {list(SUPPORTED_VERSIONS)})")
            return
        wid = h.get("worker_id")
        if not isinstance(wid, str) or not wid or len(wid) > 200:
            self._refuse("HELLO needs a worker_id")
            return
        if not check_login_proof(self.gw.config.secret, self.nonce, wid, h.get("proof")):
            self._refuse("login failed: wrong cluster secret")
            return
        try:
            spec = ModelSpec.from_hello(h)
            cap = int(h.get("capacity", 1))
            if not 1 <= cap <= MAX_CAPACITY:
                raise ValueError(f"capacity {cap} outside [1, {MAX_CAPACITY}]")
            max_frame = int(h.get("max_frame_size", DEFAULT_MAX_FRAME_SIZE))
            if max_frame < MIN_WORKER_FRAME:
                raise ValueError(f"max_frame_size {max_frame} below {MIN_WORKER_FRAME}")
            pool = self.gw.models.pool_for_worker(spec)
        except (KeyError, TypeError, ValueError) as e:
            self._refuse(f"bad registration: {e}", failed_login=False)
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.gw.logins.logged_in(self)
        self.worker_id = wid
        self.capacity = cap
        self.max_frame_size = max_frame
        self.decoder.max_frame_size = self.gw.config.max_frame_size
        self.info = {
            k: h.get(k)
            for k in (
                "model",
                "model_version",
                "runtime",
                "device",
                "max_batch_size",
                "batch_delay_ms",
                "pid",
                "host",
            )
        }
        self.state = "ready"
        self.accepting = True
        self.joined_at = time.monotonic()
        self.send(
            encode_frame(
                MsgType.WELCOME,
                {
                    "version": PROTOCOL_VERSION,
                    "gateway": self.gw.config.name,
                    "heartbeat_s": self.gw.config.heartbeat_s,
                    "dead_after_s": self.gw.config.dead_after_s,
                    "max_frame_size": self.gw.config.max_frame_size,
                },
            )
        )
        self.pool = pool
        log.info(
            "worker %s joined from %s: %s v%s on %s, capacity %d",
            wid,
            self.peer,
            spec.name,
            spec.version,
            h.get("device"),
            cap,
        )
        pool.add_worker(self)

    def _refuse(self, reason: str, retry_after: float | None = None, failed_login: bool = True) -> None:
        """Refuse the login and close. Refusals before a valid proof count as failed logins of the
        peer's address (throttled, and logged once per run of failures instead of once each)."""
        if failed_login:
            self.gw.logins.failed(self, reason)
        else:
            log.warning("refused worker connection from %s: %s", self.peer, reason)
        msg: dict[str, Any] = {"reason": reason}
        if retry_after is not None:
            msg["retry_after_s"] = round(retry_after, 1)
        self.send(encode_frame(MsgType.REFUSE, msg))
        self.flush()
        self.state = "closed"
        if self.transport is not None:
            self.transport.close()

    # ---------------------------------------------------------------------------- requests

    def send_request(self, p: Pending) -> None:
        self.pending[p.id] = p
        self.send(p.frame)

    def _on_result(self, h: dict[str, Any], payload: bytes | memoryview) -> None:
        p = self.pending.pop(h["id"], None)
        if p is None:  # late result of a request we already gave up on
            return
        self.served += 1
        assert self.pool is not None
        b = h.get("batch")
        self.pool.on_result(self, p, (h, payload), h.get("compute_ms"), b if isinstance(b, int) else 0)
        self.gw.metrics.observe_result(self.pool.spec, h, p)

    def _on_error(self, h: dict[str, Any]) -> None:
        p = self.pending.pop(h["id"], None)
        if p is None:
            return
        assert self.pool is not None
        status = int(h.get("status", 500))
        if status == 503:  # the worker turned it away (draining, full): another worker may take it
            self.in_flight -= 1
            self.pool.requeue(p, str(h.get("error", "refused")))
            self.pool.dispatch()
            return
        err = RequestFailed(
            f"worker {self.worker_id}: {h.get('error', 'failed')}", status if 400 <= status < 600 else 500
        )
        self.pool.on_result(self, p, err, None)

    def _on_load(self, h: dict[str, Any]) -> None:
        """A load report: kept for the status, and the worker's CPU use turned into a rate (the
        fraction of one core its process used since the previous report) for the autoscaler."""
        cpu = h.get("cpu_s")
        now = time.monotonic()
        if isinstance(cpu, (int, float)):
            prev = self.load.get("cpu_s")
            if isinstance(prev, (int, float)) and now > self._load_at and cpu >= prev:
                self.cpu_rate = (cpu - prev) / (now - self._load_at)
            self._load_at = now
        self.load = h

    def drain(self) -> None:
        """Ask this worker to leave: nothing new is sent to it from now; it finishes what it holds,
        says goodbye and exits (the autoscaler's scale-in, and model unloading)."""
        if self.state != "ready":
            return
        self.accepting = False
        self.draining_since = time.monotonic()
        self.send(encode_frame(MsgType.DRAIN, {}))
        log.info("draining worker %s (%s)", self.worker_id, self.peer)
        if self.pool is not None:
            self.pool.dispatch()

    # ------------------------------------------------------------------------------ liveness

    def heartbeat(self, now: float) -> None:
        if self.state != "ready":
            return
        if now - self.last_seen > self.gw.config.dead_after_s:
            self._drop(f"silent for {now - self.last_seen:.1f} s")
            return
        self.send(encode_frame(MsgType.PING, {"t": time.time()}))

    def _drop(self, reason: str, quiet: bool = False) -> None:
        if not quiet:
            log.warning("dropping worker %s (%s): %s", self.worker_id or "?", self.peer, reason)
        if self.transport is not None:
            self.transport.abort()
        self._teardown(reason)

    def _teardown(self, reason: str) -> None:
        if self.state == "gone":
            return
        was_ready = self.state == "ready"
        self.state = "gone"
        self.gw.logins.left(self)
        self.accepting = False
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.gw.connections.discard(self)
        if was_ready and self.pool is not None:
            pend = sorted(self.pending.values(), key=lambda p: p.id)
            self.pending.clear()
            self.in_flight = 0
            if pend:
                log.warning(
                    "worker %s left with %d requests in flight (%s); sending them to other workers",
                    self.worker_id,
                    len(pend),
                    reason,
                )
            else:
                log.info("worker %s left (%s)", self.worker_id, reason)
            self.pool.on_worker_lost(self, pend, reason)
            self.gw.departed.append({**self.describe(), "left": reason, "left_at": time.time()})
            del self.gw.departed[:-100]  # keep the last hundred

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
