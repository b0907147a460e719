"""The worker process: dial the gateway, log in, register, serve requests, report load, reconnect.

One process serves one model version. It needs numpy, msgspec and its framework; nothing of the
gateway's HTTP stack. The link's rules are in ``protocol/link.py``; this file is the asyncio side.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from shoal.aio import CoalescingProtocol, cancel_and_wait, settle_gc, split_hostport
from shoal.modelrepo.manifest import Manifest
from shoal.protocol.frames import DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION
from shoal.protocol.joined import JoinError, check_rows
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
    Peers,
    Ping,
    Pong,
    Refuse,
    Request,
    Requests,
    Result,
    Results,
    Role,
    State,
    Welcome,
)
from shoal.protocol.link_messages import announce
from shoal.protocol.ports import WORKER_PORT, foreign_protocol, worker_at_wrong_port
from shoal.protocol.tensors import BYTES_ELEMENT_COST, NP_DTYPES, TensorError, pack_tensors, unpack_tensors
from shoal.runtime.runtimes import Runtime
from shoal.security.tokens import login_proof
from shoal.worker.batching import Done, InferenceEngine, Item, split_outputs
from shoal.worker.reconnect import backoff_delay
from shoal.worker.shares import capacity_shares, demand

log = logging.getLogger("shoal.worker")

_FIXED = set(NP_DTYPES.values())
MAX_PEERS = 64  # gateways one PEERS may name
MAX_UNREACHED = 16  # gateways one LOAD may name as unreachable


def joinable(v: Any, rows: int) -> bool:
    """An output the gateway can cut by rows out of a joined result: a fixed-size type, one row per
    input row."""
    if not isinstance(v, np.ndarray) or v.ndim == 0:
        return False
    return v.shape[0] == rows and v.dtype.newbyteorder("=") in _FIXED


def error_text(e: BaseException) -> str:
    """An exception as a log line: some (TLS handshake failures, timeouts) have an empty message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Refused(Exception):
    """The gateway refused this worker; retrying would not help."""


class RefusedForNow(ConnectionError):
    """The gateway refused this login for a while (too many failed logins from this address)."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass
class WorkerConfig:
    # Where the cluster's gateways take workers: host:port each. A name that resolves to several
    # addresses (a Kubernetes headless Service) names a gateway at each; the gateways reached name
    # the others (PEERS). The worker links to every one and divides its capacity between them.
    gateways: list[str] = field(default_factory=lambda: [f"127.0.0.1:{WORKER_PORT}"])
    secret: bytes = b""
    worker_id: str = ""
    device: str = "cpu"
    capacity: int = 0  # 0: twice the max batch size (at least 2): one batch running, one queued
    tls_ca: str | None = None  # verify the gateway's certificate against this CA (TLS on)
    tls: bool = False  # TLS with the system's CAs
    tls_server_name: str | None = None
    drain_timeout_s: float = 30.0
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    backoff_base_s: float = 0.1
    backoff_cap_s: float = 2.0
    resolve_every_s: float = 5.0  # how often names are looked up again (gateways join and leave)
    health: tuple[str, int] | None = None  # serve GET /live and /ready here (orchestrators' probes)


@dataclass(eq=False)
class Target:
    """One address the worker dials: a gateway, unless it turns out to be one already linked."""

    host: str  # as named (for TLS and logs)
    ip: str
    port: int
    configured: bool  # from the worker's own list (dialled for as long as it runs)
    task: asyncio.Task | None = None
    link: GatewayLink | None = None  # logged in
    failures: int = 0  # failed dials in a row
    linked_before: bool = False  # a link to it was up once (a retry is then a reconnect)
    refused: str = ""  # refused for good (a wrong secret): not dialled again
    same_as: str = ""  # the gateway id it reached, already linked through another address

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class GatewayLink(CoalescingProtocol):
    """One connection to one gateway: a thin adapter around the link's state machine
    (``protocol/link.py``), which says which message may come when."""

    def __init__(self, worker: Worker, target: Target | None = None) -> None:
        super().__init__()
        self.w = worker
        self.target = target
        self.address = target.address if target is not None else "the gateway"
        self.challenged = False  # a CHALLENGE came: this is a gateway's worker link
        self.link = LinkConnection(Role.WORKER, worker.config.max_frame_size)
        self.welcomed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.gateway_id = ""
        self.in_flight = 0
        self.arrivals = 0  # requests received since the last share was computed
        self.demand = 0.0
        self.share = worker.capacity
        self.heartbeat_clock = Heartbeat(5.0, time.monotonic())

    @property
    def max_frame_size(self) -> int:
        """The largest frame the gateway accepts (from its WELCOME)."""
        return self.link.peer_max_frame_size

    @property
    def open(self) -> bool:
        return self.link.state in (State.READY, State.DRAINING) and not self.closed.done()

    def say(self, msg: Any, payload: Any = b"") -> None:
        """Send one message, unless the link is closing (the gateway has gone or said goodbye)."""
        if self.link.state in (State.READY, State.DRAINING, State.HANDSHAKE):
            self.send(self.link.send(msg, payload))

    def data_received(self, data: bytes) -> None:
        self.heartbeat_clock.seen(time.monotonic())
        if self.link.state is State.HANDSHAKE and not self.welcomed.done():
            spoke = foreign_protocol(data[:16])
            if spoke is not None:  # not a gateway's worker link: one clear line, then retried
                self.welcomed.set_exception(ConnectionError(worker_at_wrong_port(self.address, spoke)))
                self.abort()
                return
        try:
            messages = self.link.receive_data(data)
        except LinkError as e:
            log.warning("gateway broke the link protocol (%s); reconnecting", e)
            self.abort()
            return
        alone = len(messages) == 1
        for msg, payload in messages:
            if isinstance(msg, Request):
                self.w.on_request(self, msg, payload, alone)
            elif isinstance(msg, Requests):
                self.w.on_requests(self, msg, payload)
            elif isinstance(msg, Ping):
                self.say(Pong(msg.t))
            elif isinstance(msg, Peers):
                self.w.on_peers(self, msg.gateways)
            elif isinstance(msg, Cancel):
                self.w.on_cancel(self, msg.ids)
            elif isinstance(msg, Challenge):
                self.challenged = True
                self.w.on_challenge(self, msg)
            elif isinstance(msg, Welcome):
                if not self.welcomed.done():
                    self.welcomed.set_result(msg)
            elif isinstance(msg, Refuse):
                if not self.welcomed.done():
                    if msg.retry_after_s is not None:  # refused for a while, not for good
                        self.welcomed.set_exception(RefusedForNow(msg.reason, msg.retry_after_s))
                    else:
                        self.welcomed.set_exception(Refused(msg.reason))
            elif isinstance(msg, Drain):  # the gateway scales in: leave once what is held is done
                self.w.begin_drain()
            elif isinstance(msg, Goodbye):
                self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.connection_lost()
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError("gateway closed the connection during login"))
        if not self.closed.done():
            self.closed.set_result(None)

    def abort(self) -> None:
        self.link.close()
        if self.transport is not None:
            self.transport.abort()


class SameGateway(ConnectionError):
    """This address reaches a gateway the worker is already linked to through another one."""


class Worker:
    def __init__(self, config: WorkerConfig, model_dir: Path, manifest: Manifest, runtime: Runtime) -> None:
        self.config = config
        # Each BYTES element becomes a Python object: as many as the frame limit allows at the cost
        # every decoder counts them at (the gateway refuses more before they reach a worker).
        self.max_bytes_elements = config.max_frame_size // BYTES_ELEMENT_COST
        self.model_dir = model_dir
        self.manifest = manifest
        self.runtime = runtime
        mb = manifest.max_batch_size
        self.capacity = config.capacity or max(2, 2 * mb)
        self.worker_id = (
            config.worker_id or f"{socket.gethostname()}-{os.getpid()}-{manifest.name}-{manifest.version}"
        )
        self.targets: dict[str, Target] = {}  # by ip:port
        self.links: dict[str, GatewayLink] = {}  # logged-in links, by gateway id
        self.peers: dict[GatewayLink, list[str]] = {}  # what each linked gateway says of the others
        self.in_flight = 0  # over all links
        self._discovering = asyncio.Lock()
        self.engine: InferenceEngine | None = None
        self.draining = False
        self.served = 0
        self.started = time.monotonic()
        self.first_served_at: float | None = None
        self.heartbeat_s = 1.0  # until a gateway's WELCOME says otherwise
        self.dead_after_s = 5.0
        self.exit_code = 0
        self._stop = asyncio.Event()

    # ----------------------------------------------------------------------------- handshake

    def hello(self, nonce: bytes) -> Hello:
        return msgspec.convert(
            {
                "protocol": PROTOCOL_VERSION,
                "worker_id": self.worker_id,
                "proof": login_proof(self.config.secret, nonce, self.worker_id),
                **announce(self.manifest.interface()),
                "device": self.config.device,
                "capacity": self.capacity,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "max_frame_size": self.config.max_frame_size,
                "joined": True,
                "shares": True,
                "cancels": True,
            },
            Hello,
        )

    def on_challenge(self, link: GatewayLink, c: Challenge) -> None:
        if c.gateway_id and c.gateway_id in self.links:  # reached again through another address
            link.welcomed.set_exception(SameGateway(c.gateway_id))
            link.abort()
            return
        link.gateway_id = c.gateway_id
        if PROTOCOL_VERSION not in c.versions:
            link.welcomed.set_exception(
                Refused(f"gateway speaks protocol versions {c.versions}, this worker {PROTOCOL_VERSION}")
            )
            link.abort()
            return
        link.say(self.hello(c.nonce))

    # ------------------------------------------------------------------------------ requests

    def on_request(
        self, link: GatewayLink, r: Request, payload: bytes | memoryview, alone: bool = False
    ) -> None:
        """One request; ``alone``: nothing else came with it (it may run at once on this thread)."""
        link.arrivals += 1
        try:
            inputs = unpack_tensors(r.inputs, payload, self.max_bytes_elements)
        except TensorError as e:
            link.say(Error(r.id, f"bad tensors: {e}", e.status))
            return
        if self._admit(link, [r.id]):
            item = Item(r.id, inputs, r.outputs, link, t_received=time.monotonic(), request_id=r.rid)
            self._submit(link, item, alone)

    def on_cancel(self, link: GatewayLink, ids: list[int]) -> None:
        """Their clients left: the engine drops those it has not started."""
        if self.engine is not None:
            self.engine.cancel(link, ids)

    def on_requests(self, link: GatewayLink, r: Requests, payload: bytes | memoryview) -> None:
        """Several requests joined in one frame (``protocol/joined.py``): one item of the batch."""
        link.arrivals += len(r.ids)
        try:
            rows = check_rows(r.ids, r.rows, r.inputs)
            inputs = unpack_tensors(r.inputs, payload, self.max_bytes_elements)
        except (TensorError, JoinError) as e:
            for i in r.ids:
                link.say(Error(i, f"bad tensors: {e}", getattr(e, "status", 400)))
            return
        if self._admit(link, r.ids):
            rq = next((x for x in r.rids if x is not None), None)
            t = time.monotonic()
            item = Item(r.ids[0], inputs, r.outputs, link, rows, t, request_id=rq, joined=(r.ids, r.rows))
            self._submit(link, item)

    def _admit(self, link: GatewayLink, ids: list[int]) -> bool:
        """Room for these requests: else each is turned away (503) for the gateway to send elsewhere.
        The room is the worker's, over all its gateways (each keeps to its share, so this is rare)."""
        assert self.engine is not None
        why = None
        if self.engine.dead is not None:
            why = "worker out of service"
        elif self.in_flight + len(ids) > self.capacity:
            why = "worker full"
        if why is None:
            return True
        for i in ids:
            link.say(Error(i, why, 503))
        return False

    def _submit(self, link: GatewayLink, item: Item, alone: bool = False) -> None:
        assert self.engine is not None
        n = len(item.joined[0]) if item.joined else 1
        link.in_flight += n
        self.in_flight += n
        if not (alone and self.engine.run_now(item)):  # run_now answers through on_done itself
            self.engine.submit(item)

    def on_done(self, done: list[Done]) -> None:
        for d in done:
            link = d.item.conn
            ids = d.item.joined[0] if d.item.joined else [d.item.id]
            link.in_flight -= len(ids)
            self.in_flight -= len(ids)
            if link.transport is None or link.transport.is_closing():
                continue  # that connection is gone; its gateway has sent the request elsewhere
            try:
                self._answer(link, d, ids)
            except Exception as e:  # an output the link cannot carry: that request fails, alone
                log.warning("cannot send the result of request %s: %s", d.item.request_id, e)
                for i in ids:
                    link.say(Error(i, f"cannot send the result: {e}"[:500], 500))

    def _answer(self, link: GatewayLink, d: Done, ids: list[int]) -> None:
        if d.error is not None:
            rq = d.item.request_id
            if d.status not in (499, 503):  # not a failure: handed back (503), its client left (499)
                log.warning(
                    "request %s failed: %s", rq, d.error, extra={"request_id": rq, "status": d.status}
                )
            for i in ids:
                link.say(Error(i, d.error, d.status))
            return
        outputs = d.outputs or {}
        joined = d.item.joined
        ms, rows = round(d.compute_ms, 4), d.batch_rows
        times = (d.queue_ms, d.input_ms, d.output_ms)  # for the gateway's statistics
        if joined is None:
            specs, bufs = pack_tensors(outputs)
            self._send_result(link, Result(d.item.id, specs, ms, rows, *times), bufs)
        elif all(joinable(v, d.item.rows) for v in outputs.values()):
            specs, bufs = pack_tensors(outputs)
            self._send_result(link, Results(joined[0], joined[1], specs, ms, rows, *times), bufs)
        else:  # outputs the gateway cannot cut by rows (BYTES, or not one row per input row): cut here
            for i, part in zip(ids, split_outputs(outputs, joined[1]), strict=True):
                specs, bufs = pack_tensors(part)
                self._send_result(link, Result(i, specs, ms, rows, *times), bufs)

    def _send_result(self, link: GatewayLink, msg: Result | Results, bufs: list[Any]) -> None:
        size = sum(len(b) for b in bufs)
        if size > link.max_frame_size - 65536:
            raise ValueError(
                f"result of {size} bytes exceeds the {link.max_frame_size} byte frame limit of the gateway"
            )
        link.say(msg, bufs)
        self.served += len(msg.ids) if isinstance(msg, Results) else 1
        if self.first_served_at is None:
            self.first_served_at = time.monotonic()
            log.info("first request served %.3f s after start", self.first_served_at - self.started)

    def on_fatal(self, reason: str) -> None:
        """The inference thread died (a bug, not a bad request: those are answered one by one). The
        worker cannot serve any more: it leaves visibly, so the gateway stops sending to it, and
        exits with status 70 for its supervisor (an engine, systemd, Kubernetes) to replace it."""
        log.critical("%s; leaving the gateway and exiting to be replaced", reason)
        self.exit_code = 70
        self.begin_drain()

    def load_report(self, link: GatewayLink) -> Load:
        s = self.engine.stats if self.engine else None
        return Load(
            in_flight=link.in_flight,
            queued=self.engine.queued if self.engine else 0,
            capacity=link.share,
            served=self.served,
            batches=s.batches if s else 0,
            rows=s.rows if s else 0,
            busy_s=round(s.busy_s, 4) if s else 0.0,
            cpu_s=round(time.process_time(), 4),  # the whole process: model, batching and the links
            draining=self.draining,
            links=len(self.links),
            unreached=self.unreached()[:MAX_UNREACHED],
        )

    def unreached(self) -> list[str]:
        """Gateways this worker knows of and cannot reach now (reported to those it can)."""
        return sorted(
            t.address for t in self.targets.values() if t.link is None and not t.same_as and t.failures > 0
        )

    # ---------------------------------------------------------------------- capacity shares

    def rebalance(self, tick: bool = False) -> None:
        """Divide the capacity between the linked gateways (``shares.py``); tell each whose share
        changed at once. ``tick``: a heartbeat passed, so the links' recent arrivals count as demand."""
        links = list(self.links.values())
        if tick:
            for link in links:
                link.demand = demand(link.demand, link.arrivals)
                link.arrivals = 0
        for link, share in zip(links, capacity_shares(self.capacity, [x.demand for x in links]), strict=True):
            if share != link.share:
                link.share = share
                if not tick:  # a heartbeat sends every link its LOAD anyway
                    link.say(self.load_report(link))

    # -------------------------------------------------------------------- finding gateways

    def on_peers(self, link: GatewayLink, gateways: list[str]) -> None:
        """A gateway named every gateway of the cluster it knows: dial those not dialled yet."""
        self.peers[link] = [g for g in gateways[:MAX_PEERS] if isinstance(g, str) and 0 < len(g) <= 300]
        asyncio.get_running_loop().create_task(self._discover())

    async def _resolve(self, entry: str) -> list[tuple[str, str, int]]:
        """(name, address, port) of each gateway an entry names; [] when it cannot be looked up now."""
        try:
            host, port = split_hostport(entry, WORKER_PORT)
        except ValueError:
            log.warning("ignoring gateway address %r: not host:port", entry)
            return []
        try:
            ipaddress.ip_address(host)
            return [(host, host, port)]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                continue
            ips = sorted({str(i[4][0]) for i in infos})
            if ips:
                return [(host, ip, port) for ip in ips]
        return []

    async def _discover(self) -> None:
        """Look up the configured gateways and those the linked ones name; dial each new address,
        forget learned ones no longer named (unless linked). A name that cannot be looked up now
        keeps the addresses it had. One lookup at a time: a slow one must not undo a newer one."""
        async with self._discovering:
            await self._discover_now()

    async def _discover_now(self) -> None:
        configured = list(self.config.gateways)
        learned = sorted({g for names in self.peers.values() for g in names} - set(configured))
        found: dict[str, tuple[str, str, int, bool]] = {}
        for entries, is_configured in ((configured, True), (learned, False)):
            for entry in entries:
                resolved = await self._resolve(entry)
                if not resolved:  # keep what this entry gave before
                    for key, t in self.targets.items():
                        if entry.startswith(t.host + ":") or entry == t.host:
                            found.setdefault(key, (t.host, t.ip, t.port, is_configured))
                for host, ip, port in resolved:
                    key = f"{ip}:{port}"
                    if key not in found or is_configured:
                        found[key] = (host, ip, port, is_configured)
        if self._stop.is_set():
            return
        for key, (host, ip, port, is_configured) in found.items():
            t = self.targets.get(key)
            if t is None:
                t = self.targets[key] = Target(host, ip, port, is_configured)
            t.configured = t.configured or is_configured
            if (t.task is None or t.task.done()) and not t.refused:
                t.task = asyncio.get_running_loop().create_task(self._dial(t), name=f"gateway {key}")
        for key, t in list(self.targets.items()):
            if key not in found and not t.configured:
                if t.link is None:  # a learned gateway that is gone: stop dialling it
                    if t.task is not None:
                        t.task.cancel()
                    del self.targets[key]

    async def _discovery(self) -> None:
        while not self._stop.is_set():
            await self._discover()
            try:
                await asyncio.wait_for(self._stop.wait(), self.config.resolve_every_s)
            except asyncio.TimeoutError:
                pass

    # ----------------------------------------------------------------------------- lifecycle

    def ssl_context(self) -> ssl.SSLContext | None:
        c = self.config
        if not (c.tls or c.tls_ca):
            return None
        ctx = ssl.create_default_context(cafile=c.tls_ca)
        return ctx

    async def _connect(self, t: Target) -> GatewayLink:
        loop = asyncio.get_running_loop()
        c = self.config
        ctx = self.ssl_context()
        _, link = await loop.create_connection(
            lambda: GatewayLink(self, t),
            t.ip,
            t.port,
            ssl=ctx,
            server_hostname=(c.tls_server_name or t.host) if ctx else None,
        )
        try:
            welcome = await asyncio.wait_for(link.welcomed, 10.0)
        except asyncio.TimeoutError:
            link.abort()
            if link.challenged:
                raise
            # Silence: an HTTP or gRPC server waits for a request a worker never sends.
            raise ConnectionError(worker_at_wrong_port(t.address, None)) from None
        except BaseException:
            link.abort()
            raise
        self.dead_after_s = welcome.dead_after_s
        self.heartbeat_s = welcome.heartbeat_s
        link.heartbeat_clock.dead_after_s = welcome.dead_after_s
        return link

    async def _dial(self, t: Target) -> None:
        """Keep one link to the gateway at ``t``: connect, log in, serve, reconnect with back-off.
        Ends when the worker stops, the gateway refuses it for good, or ``t`` is forgotten."""
        c = self.config
        while not self._stop.is_set():
            try:
                link = await self._connect(t)
            except Refused as e:
                log.error("gateway %s refused this worker: %s", t.address, e)
                t.refused = str(e)
                self._refused_everywhere()
                return
            except SameGateway as e:  # wait for that link to end, then try this address again
                t.same_as = str(e)
                other = self.links.get(t.same_as)
                if other is not None:
                    await asyncio.shield(other.closed)
                t.same_as = ""
                continue
            except (OSError, asyncio.TimeoutError, ConnectionError) as e:
                d = backoff_delay(t.failures, c.backoff_base_s, c.backoff_cap_s, random.random())
                if isinstance(e, RefusedForNow):
                    d = max(d, e.retry_after_s)
                if t.failures == 0:  # expected (a worker started before its gateway, a restart): once
                    log.info(
                        "gateway %s %s (%s); retrying until it is",
                        t.address,
                        "not reachable" if t.linked_before else "not reachable yet",
                        error_text(e),
                    )
                elif t.failures % 20 == 0:  # no longer expected: half a minute or more of trying
                    log.warning(
                        "still cannot reach gateway %s after %d attempts (%s); retrying in %.2f s",
                        t.address,
                        t.failures,
                        error_text(e),
                        d,
                    )
                t.failures += 1
                try:
                    await asyncio.wait_for(self._stop.wait(), d)
                except asyncio.TimeoutError:
                    pass
                continue
            t.failures = 0
            t.linked_before = True
            gid = link.gateway_id or t.address  # an older gateway has no id: its address is one
            if gid in self.links:  # two addresses reached one gateway at once: keep the first
                link.say(Goodbye("already linked to this gateway"))
                link.flush()
                link.abort()
                continue
            t.link = link
            self.links[gid] = link
            self.rebalance()
            log.info(
                "worker %s serving %s v%s on %s via gateway %s at %s (%d gateway%s, capacity %d, this one's share %d)",
                self.worker_id,
                self.manifest.name,
                self.manifest.version,
                c.device,
                gid,
                t.address,
                len(self.links),
                "" if len(self.links) == 1 else "s",
                self.capacity,
                link.share,
            )
            if self.draining:
                link.say(Drain())
            try:
                await self._serve(link)
            finally:
                t.link = None
                if self.links.get(gid) is link:
                    del self.links[gid]
                self.peers.pop(link, None)
                self.rebalance()  # the others' shares grow at once
            if self.draining and not self._stop.is_set():  # stopping anyway: the gateway went first
                log.info("gateway %s at %s closed the link while this worker drains", gid, t.address)
            elif not self._stop.is_set():
                log.warning("lost gateway %s at %s; reconnecting", gid, t.address)

    def _refused_everywhere(self) -> None:
        """Every configured gateway refused this worker for good (a wrong secret): exit with 3."""
        configured = [t for t in self.targets.values() if t.configured]
        if configured and all(t.refused for t in configured) and not self.links:
            self.exit_code = self.exit_code or 3
            self._stop.set()

    async def run(self) -> int:
        # The event loop and the inference thread share the GIL; when a batch ends, the inference
        # thread should get it back within half a millisecond, not Python's default 5 ms, or the
        # model idles while the loop decodes the next requests.
        sys.setswitchinterval(0.0005)
        loop = asyncio.get_running_loop()
        self.engine = InferenceEngine(
            self.runtime, self.manifest, loop.call_soon_threadsafe, self.on_done, self.on_fatal
        )
        self.engine.start()
        settle_gc()  # the model loaded: it leaves the collector's view
        health = None
        if self.config.health is not None:
            from shoal.worker.health import serve_health

            health = await serve_health(*self.config.health, self.ready)
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.begin_drain)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (a Ray actor)
                pass
        tasks = [
            loop.create_task(self._discovery(), name="gateway discovery"),
            loop.create_task(self._shares(), name="capacity shares"),
        ]
        try:
            await self._stop.wait()
        finally:
            dials = [t.task for t in self.targets.values() if t.task is not None]
            await cancel_and_wait(tasks + dials)
            for link in list(self.links.values()):
                link.abort()
            self.engine.stop()
            if health is not None:
                health.close()
        return self.exit_code

    async def _shares(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self.rebalance(tick=True)

    async def _serve(self, link: GatewayLink) -> None:
        """Report load every heartbeat until the link closes or a drain completes."""
        while not link.closed.done():
            link.say(self.load_report(link))
            try:
                await asyncio.wait_for(asyncio.shield(link.closed), self.heartbeat_s)
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            if link.heartbeat_clock.dead(now):
                log.warning("gateway silent for %.1f s; reconnecting", link.heartbeat_clock.silent_for(now))
                link.abort()
                break

    def ready(self) -> bool:
        """Logged in to a gateway and serving (the health endpoint's /ready)."""
        return (
            any(link.open for link in self.links.values())
            and not self.draining
            and self.engine is not None
            and self.engine.dead is None
        )

    def begin_drain(self) -> None:
        """SIGTERM, or a gateway scaling in: accept nothing new from any gateway, finish what is held,
        say goodbye, exit."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: finishing %d requests, accepting no more", self.in_flight)
        for link in self.links.values():
            link.say(Drain())
        asyncio.get_running_loop().create_task(self._finish_drain())

    async def _finish_drain(self) -> None:
        end = time.monotonic() + self.config.drain_timeout_s
        # Requests a gateway sent before it read DRAIN may still arrive: wait until none is held
        # and none arrived for a moment.
        quiet_since = time.monotonic()
        while time.monotonic() < end:
            if self.in_flight:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 0.2:
                break
            await asyncio.sleep(0.02)
        for link in list(self.links.values()):
            if link.transport is not None:
                link.say(Goodbye("drained"))
                link.flush()
                link.transport.close()
        self._stop.set()
