"""The central directory server: a raw ASGI application on uvicorn, like the gateway's.

State per replica: the live table of clusters (from their reports, which go to every replica), route
counts since each cluster's last report, and the devices seen recently. Everything that must agree
between replicas is in the database: accounts, the master secret (so all replicas derive the same
cluster keys and session keys) and commands for devices.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import re
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.exc import DBAPIError

import shoal
from shoal.aio import cancel_and_wait
from shoal.central import passwords
from shoal.central.db import ACCOUNT_KINDS, AccountExists, Store, redact
from shoal.central.metrics import central_registry
from shoal.central.openapi import openapi_document
from shoal.central.policy import ClusterInfo, ModelLoad, choose_cluster, is_live, load_of, version_key
from shoal.httpserver import EmbeddedHttpServer
from shoal.security.throttle import Throttle
from shoal.security.tokens import TokenError, sign_token, verify_token

log = logging.getLogger("shoal.central")

SESSION_AUDIENCE = "shoal-central"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
MAX_MODELS_PER_REPORT = 1000
DEVICE_LIVE_S = 60.0  # a device counts as live this long after its last request
FORGET_CLUSTER_S = 600.0  # a silent cluster stays on the status page (as not live) this long
STATUS_PAGE = Path(__file__).parent / "status.html"


@dataclass
class CentralConfig:
    http_host: str = "127.0.0.1"
    http_port: int = 7000
    db_url: str = "sqlite:///./shoal-central.db"
    token_ttl_s: float = 300.0
    session_ttl_s: float = 3600.0
    report_interval_s: float = 1.0
    missed_reports: int = 3  # a cluster is out of the route table after this many missed reports
    webhook_url: str | None = None
    webhook_interval_s: float = 10.0
    webhook_timeout_s: float = 5.0
    tls_cert: str | None = None
    tls_key: str | None = None
    bootstrap_operator: tuple[str, str] | None = None
    auth_cache_s: float = 10.0
    max_body_size: int = 1024 * 1024
    max_wait_s: float = 60.0  # longest long poll a device may ask for
    command_poll_s: float = 1.0  # how often a replica looks for commands other replicas stored
    backlog: int = 2048
    db_timeout_s: float = 5.0  # a query that takes longer is given up: the request is 503
    startup_grace_s: float | None = None  # routes "not yet" (503) until clusters report; None: 3 reports

    def check(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.token_ttl_s <= 0 or self.report_interval_s <= 0 or self.webhook_interval_s <= 0:
            raise ValueError("--token-ttl, the report interval and --webhook-interval must be positive")
        if self.webhook_url and urllib.parse.urlsplit(self.webhook_url).scheme not in ("http", "https"):
            raise ValueError("--webhook must be an http:// or https:// URL")


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    headers: dict[bytes, bytes]
    body: bytes
    client: str

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; 400 saying what is wrong otherwise."""
        if not self.body:
            raise HttpError(400, "malformed JSON body: the body is empty (send a JSON object)")
        try:
            doc = orjson.loads(self.body)
        except orjson.JSONDecodeError as e:
            raise HttpError(400, f"malformed JSON body: {e}") from None
        if not isinstance(doc, dict):
            raise HttpError(400, "malformed JSON body: expected a JSON object")
        return doc

    def no_body(self) -> None:
        """Routes without a body still refuse one that is not JSON, so every route answers alike."""
        if self.body.strip():
            self.json()


Handler = Callable[["Central", Request], Awaitable[tuple[int, Any]]]


@dataclass
class _Route:
    method: str
    pattern: str
    handler: Handler
    parts: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.parts = self.pattern.strip("/").split("/")

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self.parts):
            return None
        params: dict[str, str] = {}
        for p, s in zip(self.parts, segments, strict=True):
            if p.startswith("{"):
                if not s:
                    return None
                params[p[1:-1]] = urllib.parse.unquote(s)
            elif p != s:
                return None
        return params


ROUTES: list[_Route] = []


def route(method: str, pattern: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        ROUTES.append(_Route(method, pattern, fn))
        return fn

    return deco


# ------------------------------------------------------------------------------------- field checks


def _str(doc: dict[str, Any], key: str, *, required: bool = True, max_len: int = 256) -> str | None:
    v = doc.get(key)
    if v is None:
        if required:
            raise HttpError(400, f"missing field '{key}'")
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise HttpError(400, f"field '{key}' must be a string")
    v = str(v)
    if not v or len(v) > max_len:
        raise HttpError(400, f"field '{key}' must have 1 to {max_len} characters")
    return v


def _num(doc: dict[str, Any], key: str, default: float = 0.0) -> float:
    v = doc.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v < 0 or v == float("inf"):
        raise HttpError(400, f"field '{key}' must be a non-negative number")
    return float(v)


def _name(value: str, what: str) -> str:
    if not NAME_RE.match(value):
        raise HttpError(
            400, f"{what} {value!r} is not a valid name (letters, digits, '.', '_', '@', '-'; up to 128)"
        )
    return value


def _kind(value: str) -> str:
    if value not in ACCOUNT_KINDS:
        raise HttpError(400, f"unknown account kind {value!r}: one of {', '.join(ACCOUNT_KINDS)}")
    return value


def _parse_basic(value: bytes) -> tuple[str, str]:
    try:
        raw = base64.b64decode(value[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise HttpError(401, "malformed Basic credentials") from None
    name, sep, password = raw.partition(":")
    if not sep or not name:
        raise HttpError(401, "malformed Basic credentials (expected name:password)")
    return name, password


_RETRY_1 = [(b"retry-after", b"1")]


def _challenge(kind: str) -> list[tuple[bytes, bytes]]:
    return [(b"www-authenticate", f'Basic realm="shoal central ({kind})", charset="UTF-8"'.encode())]


# ------------------------------------------------------------------------------------------ server


class Central:
    def __init__(self, config: CentralConfig, store: Store | None = None) -> None:
        config.check()
        self.config = config
        self.store = store or Store(config.db_url, timeout_s=config.db_timeout_s)
        self.replica = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self.listening_since = time.monotonic()
        self.http_port = 0
        self.clusters: dict[str, ClusterInfo] = {}
        self.cluster_first_seen: dict[str, float] = {}
        self.assigned: dict[str, float] = {}  # routes handed out per cluster since its last report
        self.devices: dict[str, float] = {}  # device name -> unix time last seen
        self.routes_answered = 0
        self.routes_unserved = 0
        self.reports = 0
        self.auth_failures = 0
        self.auth_throttled = 0
        # Failed logins, per account and per source address: see security/throttle.py. An address
        # may fail more often than an account (several devices behind one NAT).
        self.account_throttle = Throttle(free=3, base_s=2.0, cap_s=300.0)
        self.address_throttle = Throttle(free=10, base_s=1.0, cap_s=300.0)
        self.webhook_stats = {"sent": 0, "failed": 0, "skipped": 0, "last_error": None, "last_ok_at": None}
        self.verified = passwords.VerifiedCache(config.auth_cache_s)
        self._kdf_slots = asyncio.Semaphore(4)  # bound memory (16 MiB each) and CPU spent on scrypt
        self._master = b""
        self._route_keys: dict[str, bytes] = {}
        self._session_key = b""
        self._exists: dict[tuple[str, str], float] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}
        self._last_command_id = 0
        self._http: EmbeddedHttpServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._page = STATUS_PAGE.read_bytes()
        self._openapi = orjson.dumps(openapi_document(shoal.__version__))
        self.metrics = central_registry(self)

    # ------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        cfg = self.config
        await self.store.open()
        self._master = await self.store.master_secret()
        self._session_key = hmac.new(self._master, b"device-session", hashlib.sha256).digest()
        self._last_command_id = await self.store.last_command_id()
        if cfg.bootstrap_operator is not None:
            name, password = cfg.bootstrap_operator
            try:
                await self.store.add_account("operator", name, await self._hash(password))
                log.info("created operator account %r", name)
            except AccountExists:
                log.info("operator account %r already exists; left as it is", name)
        if await self.store.count_accounts("operator") == 0:
            log.warning(
                "no operator account yet: add one with 'shoal central accounts add operator NAME' "
                "or start with --bootstrap-operator NAME"
            )
        # Keep-alive longer than a long poll, so devices keep their connection between polls.
        self._http = EmbeddedHttpServer(
            self, cfg.http_host, cfg.http_port, cfg.backlog, cfg.tls_cert, cfg.tls_key, keep_alive_s=75
        )
        self.http_port = self._http.port
        await self._http.start()
        self.listening_since = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._command_poller(), name="command-poller"),
            asyncio.create_task(self._janitor(), name="janitor"),
        ]
        if cfg.webhook_url:
            self._tasks.append(asyncio.create_task(self._webhook_loop(), name="webhook"))
        log.info(
            "central %s serving HTTP%s on %s:%d, database %s",
            self.replica,
            "S" if cfg.tls_cert else "",
            cfg.http_host,
            self.http_port,
            redact(cfg.db_url),
        )

    async def stop(self) -> None:
        if self._http is not None:
            self._http.server.should_exit = True
        for ev in self._waiters.values():
            ev.set()
        await cancel_and_wait(self._tasks)
        if self._http is not None:
            await self._http.stop()
        await self.store.close()

    # ------------------------------------------------------------------------------------ keys

    def token_key(self, cluster: str) -> bytes:
        """The key a cluster verifies its route tokens with; the same on every replica."""
        key = self._route_keys.get(cluster)
        if key is None:
            key = hmac.new(self._master, b"route-token:" + cluster.encode("utf-8"), hashlib.sha256).digest()
            self._route_keys[cluster] = key
        return key

    # ------------------------------------------------------------------------------------ auth

    async def _hash(self, password: str) -> str:
        async with self._kdf_slots:
            return await asyncio.to_thread(passwords.hash_password, password)

    async def _still_exists(self, kind: str, name: str) -> None:
        # A session outlives nothing: once its account is removed it stops working within the cache time.
        key = (kind, name)
        now = time.monotonic()
        if self._exists.get(key, 0.0) > now:
            return
        if await self.store.password_hash(kind, name) is None:
            raise HttpError(401, f"invalid session token: no {kind} account named {name!r}")
        if len(self._exists) > 100_000:
            self._exists.clear()
        self._exists[key] = now + self.config.auth_cache_s

    async def authenticate(self, req: Request, kind: str, allow_session: bool = False) -> str:
        """The account name behind the request's credentials, or 401."""
        value = req.headers.get(b"authorization")
        if value is None:
            hint = "Basic (name:password)" + (" or Bearer <session token>" if allow_session else "")
            raise HttpError(401, f"missing credentials: send Authorization: {hint}", _challenge(kind))
        if allow_session and value[:7].lower() == b"bearer ":
            token = value[7:].decode("latin-1").strip()
            try:
                claims = verify_token(token, self._session_key, audience=SESSION_AUDIENCE)
            except TokenError as e:
                self.auth_failures += 1
                raise HttpError(401, f"invalid session token: {e}; log in again") from None
            sub = claims.get("sub")
            if claims.get("kind") != kind or not isinstance(sub, str):
                raise HttpError(401, "invalid session token: not a device session")
            await self._still_exists(kind, sub)
            return sub
        if value[:6].lower() != b"basic ":
            raise HttpError(401, "unsupported credentials: send Authorization: Basic", _challenge(kind))
        name, password = _parse_basic(value)
        if self.verified.hit(kind, name, password):
            return name
        # Throttled before the slow hash runs: a guessing client costs a 429, not a KDF.
        now = time.monotonic()
        account, address = (kind, name[:128]), req.client.rpartition(":")[0]
        wait = max(self.account_throttle.retry_after(account, now), self.address_throttle.retry_after(address, now))
        if wait > 0:
            self.auth_throttled += 1
            raise HttpError(
                429,
                f"too many failed logins; try again in {wait:.0f} s",
                [(b"retry-after", str(max(1, round(wait))).encode())],
            )
        stored = await self.store.password_hash(kind, name) if len(name) <= 128 else None
        async with self._kdf_slots:
            if stored is None:
                await asyncio.to_thread(passwords.burn_time, password)
                ok = False
            else:
                ok = await asyncio.to_thread(passwords.verify_password, password, stored)
        if not ok:
            self.auth_failures += 1
            now = time.monotonic()
            by_account = self.account_throttle.failed(account, now)
            by_address = self.address_throttle.failed(address, now)
            # One line per throttled source, not one per guess.
            if by_account.failures == 1:
                log.warning("refused %s credentials for %r from %s", kind, name[:128], req.client)
            for v, what in ((by_account, f"{kind} account {name[:128]!r}"), (by_address, f"address {address}")):
                if v.newly_blocked:
                    log.warning(
                        "%d failed logins for %s; refusing its logins for %.0f s", v.failures, what, v.blocked_s
                    )
            raise HttpError(401, f"wrong name or password for a {kind} account", _challenge(kind))
        self.account_throttle.succeeded(account)
        self.verified.add(kind, name, password)
        return name

    # ------------------------------------------------------------------------------------ ASGI

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        method = scope["method"]
        path = scope["path"]
        segments = path.strip("/").split("/") if path != "/" else [""]
        found: tuple[_Route, dict[str, str]] | None = None
        allowed: list[str] = []
        for r in ROUTES:
            params = r.match(segments)
            if params is not None:
                allowed.append(r.method)
                if r.method == method:
                    found = (r, params)
                    break
        try:
            if found is None:
                if allowed:
                    raise HttpError(405, f"{path} takes {' or '.join(sorted(set(allowed)))}, not {method}")
                raise HttpError(404, f"no such endpoint: {method} {path}")
            r, params = found
            headers = dict(scope["headers"])
            body = await self._read_body(headers, receive)
            query = dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            client = scope.get("client") or ("?", 0)
            req = Request(method, path, params, query, headers, body, f"{client[0]}:{client[1]}")
            status, payload = await r.handler(self, req)
        except HttpError as e:
            await _reply(send, e.status, orjson.dumps({"error": e.message}), e.headers)
            return
        except (DBAPIError, OSError, asyncio.TimeoutError) as e:
            # The database is down or unreachable: say so, so clients retry or use another replica.
            log.warning("database error answering %s %s: %s", method, path, str(e).splitlines()[0][:200])
            await _reply(send, 503, orjson.dumps({"error": "the central database is unreachable; try again"}))
            return
        except Exception:
            log.exception("error answering %s %s", method, path)
            await _reply(send, 500, orjson.dumps({"error": "internal error (see the central's log)"}))
            return
        if isinstance(payload, tuple):  # (bytes, content type)
            await _reply(send, status, payload[0], [(b"content-type", payload[1])], json=False)
        else:
            await _reply(send, status, orjson.dumps(payload))

    async def _read_body(self, headers: dict[bytes, bytes], receive: Any) -> bytes:
        limit = self.config.max_body_size
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                if int(cl) > limit:
                    raise HttpError(413, f"body exceeds the {limit} byte limit")
            except ValueError:
                raise HttpError(400, "bad Content-Length") from None
        parts = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise HttpError(499, "client went away")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"body exceeds the {limit} byte limit")
            parts.append(chunk)
            if not msg.get("more_body"):
                return b"".join(parts)

    # -------------------------------------------------------------------------------- views

    def seen(self, device: str) -> None:
        self.devices[device] = time.time()

    def cluster_view(self, c: ClusterInfo, now: float) -> dict[str, Any]:
        models = [
            {
                "name": m.name,
                "version": m.version,
                "ready": m.ready,
                "asleep": m.asleep,
                "in_flight": m.in_flight,
                "capacity": m.capacity,
                "queue": m.queue,
                "latency_ms": m.latency_ms,
                "workers": m.workers,
                "load": _finite(load_of(m)),
            }
            for m in sorted(c.models, key=lambda m: (m.name, version_key(m.version)))
        ]
        in_flight = sum(m.in_flight + m.queue for m in c.models)
        capacity = sum(m.capacity for m in c.models)
        return {
            "name": c.name,
            "address": c.address,
            "live": is_live(c, now, self.max_age_s),
            "last_report_s": round(now - c.last_report, 3),
            "load": round(in_flight / capacity, 4) if capacity > 0 else None,
            "models": models,
        }

    @property
    def max_age_s(self) -> float:
        return self.config.missed_reports * self.config.report_interval_s

    def live_clusters(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            self.cluster_view(c, now)
            for c in sorted(self.clusters.values(), key=lambda c: c.name)
            if is_live(c, now, self.max_age_s)
        ]

    async def status(self) -> dict[str, Any]:
        now = time.monotonic()
        wall = time.time()
        devices = sorted(
            ({"name": d, "last_seen_s": round(wall - t, 1)} for d, t in self.devices.items()),
            key=lambda d: d["last_seen_s"],
        )
        return {
            "central": {
                "replica": self.replica,
                "version": shoal.__version__,
                "uptime_s": round(wall - self.started_at, 1),
                "database": self.store.dialect,
                "report_interval_s": self.config.report_interval_s,
            },
            "clusters": [
                self.cluster_view(c, now) for c in sorted(self.clusters.values(), key=lambda c: c.name)
            ],
            "devices": devices,
            "devices_live": len(devices),
            "routes": {"answered": self.routes_answered, "unserved": self.routes_unserved},
            "reports": self.reports,
            "auth_failures": self.auth_failures,
            "auth_throttled": self.auth_throttled,
            "commands": await self.store.command_counts(),
            "webhook": {"url_set": bool(self.config.webhook_url), **self.webhook_stats},
        }

    # --------------------------------------------------------------------------- background

    async def _janitor(self) -> None:
        # Forget devices not seen for a while and clusters silent for long, so memory stays bounded.
        while True:
            await asyncio.sleep(5.0)
            cutoff = time.time() - DEVICE_LIVE_S
            for d in [d for d, t in self.devices.items() if t < cutoff]:
                del self.devices[d]
            now = time.monotonic()
            for name in [n for n, c in self.clusters.items() if now - c.last_report > FORGET_CLUSTER_S]:
                self.clusters.pop(name, None)
                self.assigned.pop(name, None)

    async def _command_poller(self) -> None:
        # Commands may be stored by any replica: look for new ones while devices are waiting here.
        while True:
            await asyncio.sleep(self.config.command_poll_s)
            if not self._waiters:
                continue
            try:
                rows = await self.store.commands_since(self._last_command_id)
            except Exception as e:  # the database may be briefly unreachable; try again next tick
                log.warning("looking for new commands failed: %s", e)
                continue
            for cid, device in rows:
                self._last_command_id = max(self._last_command_id, cid)
                ev = self._waiters.get(device)
                if ev is not None:
                    ev.set()

    def _wake(self, device: str) -> None:
        ev = self._waiters.get(device)
        if ev is not None:
            ev.set()

    async def wait_for_commands(self, device: str, wait_s: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + wait_s
        self._waiting[device] = self._waiting.get(device, 0) + 1
        try:
            while True:
                ev = self._waiters.setdefault(device, asyncio.Event())
                ev.clear()
                cmds = await self.store.pending_commands(device)
                left = deadline - time.monotonic()
                if cmds or left <= 0 or (self._http is not None and self._http.stopping):
                    return cmds
                try:
                    # Re-check now and then even without a wake-up: ids from other replicas may commit
                    # out of order, and the poller only looks past the highest id it saw.
                    await asyncio.wait_for(ev.wait(), timeout=min(left, 5.0))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._waiting[device] -= 1
            if self._waiting[device] == 0:
                del self._waiting[device]
                self._waiters.pop(device, None)

    def webhook_payload(self, acked: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "event": "status",
            "central": self.replica,
            "time": time.time(),
            "clusters": self.live_clusters(),
            "devices_live": len(self.devices),
            "commands_acked": acked,
        }

    async def _webhook_loop(self) -> None:
        cfg = self.config
        assert cfg.webhook_url
        target = urllib.parse.urlsplit(cfg.webhook_url)
        where = f"{target.scheme}://{target.hostname}:{target.port or ''}{target.path}"  # no secrets in logs
        since = time.time()
        pending: asyncio.Task | None = None
        while True:
            await asyncio.sleep(cfg.webhook_interval_s)
            if pending is not None and not pending.done():
                self.webhook_stats["skipped"] += 1
                continue
            try:
                now = time.time()
                acked = await self.store.acked_since(since)
                body = orjson.dumps(self.webhook_payload(acked))
            except Exception as e:
                self.webhook_stats["failed"] += 1
                self.webhook_stats["last_error"] = f"building the status failed: {e}"
                continue

            async def post(body: bytes = body, now: float = now) -> None:
                nonlocal since
                try:
                    await asyncio.to_thread(_http_post, cfg.webhook_url or "", body, cfg.webhook_timeout_s)
                    self.webhook_stats["sent"] += 1
                    self.webhook_stats["last_ok_at"] = time.time()
                    since = now
                except Exception as e:
                    self.webhook_stats["failed"] += 1
                    self.webhook_stats["last_error"] = str(e)[:200]
                    log.warning("webhook %s failed (%d so far): %s", where, self.webhook_stats["failed"], e)

            # The post runs on its own, so a slow endpoint delays only the next post, never routing.
            pending = asyncio.create_task(post(), name="webhook-post")


def _http_post(url: str, body: bytes, timeout: float) -> None:
    req = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"content-type": "application/json", "user-agent": f"shoal-central/{shoal.__version__}"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read(65536)


def _finite(x: float) -> float | None:
    return None if x == float("inf") else round(x, 4)


async def _reply(
    send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None, json: bool = True
) -> None:
    h = [(b"content-type", b"application/json")] if json else []
    h += [(b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
    # The page shows operator data: no other site may frame it, no browser may guess its type.
    h += [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]
    h += headers or []
    await send({"type": "http.response.start", "status": status, "headers": h})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------ routes


@route("GET", "/")
async def status_page(c: Central, req: Request) -> tuple[int, Any]:
    # The page is behind operator Basic auth: the browser asks once, then sends the same credentials
    # with the page's own requests to /v1/status.
    await c.authenticate(req, "operator")
    return 200, (c._page, b"text/html; charset=utf-8")


@route("GET", "/v1/health")
async def health(c: Central, req: Request) -> tuple[int, Any]:
    req.no_body()
    return 200, {"ok": True, "replica": c.replica}


@route("GET", "/v1/openapi.json")
async def openapi(c: Central, req: Request) -> tuple[int, Any]:
    req.no_body()
    return 200, (c._openapi, b"application/json")


@route("GET", "/metrics")
async def metrics(c: Central, req: Request) -> tuple[int, Any]:
    # Operator credentials, like the rest of the status: Prometheus scrapes with basic_auth.
    await c.authenticate(req, "operator")
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return 200, (generate_latest(c.metrics), CONTENT_TYPE_LATEST.encode())


@route("POST", "/v1/login")
async def login(c: Central, req: Request) -> tuple[int, Any]:
    device = await c.authenticate(req, "device")
    req.no_body()
    c.seen(device)
    ttl = c.config.session_ttl_s
    token = sign_token({"aud": SESSION_AUDIENCE, "sub": device, "kind": "device"}, c._session_key, ttl)
    return 200, {"token": token, "expires_in": int(ttl), "kind": "device"}


@route("POST", "/v1/route")
async def route_device(c: Central, req: Request) -> tuple[int, Any]:
    device = await c.authenticate(req, "device", allow_session=True)
    doc = req.json()
    model = _str(doc, "model")
    version = _str(doc, "version", required=False)
    exclude = doc.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude) or len(exclude) > 100:
        raise HttpError(400, "field 'exclude' must be a list of cluster names")
    assert model is not None
    c.seen(device)
    choice = choose_cluster(
        c.clusters.values(),
        model,
        version,
        exclude,
        now=time.monotonic(),
        max_age_s=c.max_age_s,
        assigned=c.assigned,
    )
    if choice is None:
        c.routes_unserved += 1
        what = f"model '{model}'" + (f" version '{version}'" if version is not None else "")
        extra = f" (excluding {', '.join(exclude)})" if exclude else ""
        grace = c.max_age_s if c.config.startup_grace_s is None else c.config.startup_grace_s
        if time.monotonic() - c.listening_since < grace:
            # Just started: clusters are still sending their first reports. Not "no", but "not yet".
            raise HttpError(
                503, f"central has just started and clusters are reporting; no route for {what} yet", _RETRY_1
            )
        raise HttpError(404, f"no live cluster serves {what}{extra}")
    name = choice.cluster.name
    c.assigned[name] = c.assigned.get(name, 0.0) + 1.0
    c.routes_answered += 1
    now = time.time()
    ttl = c.config.token_ttl_s
    claims = {"aud": name, "sub": device, "model": model}
    if version is not None:
        claims["version"] = version  # the token then opens that version only
    token = sign_token(claims, c.token_key(name), ttl, now=now)
    return 200, {
        "cluster": name,
        "url": choice.cluster.address,
        "token": token,
        "expires_at": int(now + ttl),
        "model": model,
        "version": choice.entry.version,
    }


@route("POST", "/v1/clusters/report")
async def report(c: Central, req: Request) -> tuple[int, Any]:
    name = await c.authenticate(req, "cluster")
    doc = req.json()
    address = _str(doc, "address", max_len=2048)
    assert address is not None
    u = urllib.parse.urlsplit(address)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise HttpError(400, f"field 'address' must be an http:// or https:// URL, not {address!r}")
    raw = doc.get("models")
    if not isinstance(raw, list) or len(raw) > MAX_MODELS_PER_REPORT:
        raise HttpError(400, f"field 'models' must be a list of at most {MAX_MODELS_PER_REPORT} entries")
    models = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise HttpError(400, f"models[{i}] must be an object")
        try:
            ready, asleep = m.get("ready", True), m.get("asleep", False)
            if not isinstance(ready, bool) or not isinstance(asleep, bool):
                raise HttpError(400, "fields 'ready' and 'asleep' must be true or false")
            workers = m.get("workers", 0)
            if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
                raise HttpError(400, "field 'workers' must be a non-negative integer")
            models.append(
                ModelLoad(
                    name=_str(m, "name") or "",
                    version=_str(m, "version", max_len=64) or "",
                    ready=ready,
                    in_flight=_num(m, "in_flight"),
                    capacity=_num(m, "capacity", 1.0),
                    queue=_num(m, "queue"),
                    latency_ms=_num(m, "latency_ms"),
                    workers=workers,
                    asleep=asleep,
                )
            )
        except HttpError as e:
            raise HttpError(400, f"models[{i}]: {e.message}") from None
    now = time.monotonic()
    old = c.clusters.get(name)
    if old is None or not is_live(old, now, c.max_age_s):
        log.info("cluster %r is live at %s with %d model versions", name, address, len(models))
    c.clusters[name] = ClusterInfo(name, address, tuple(models), now)
    c.cluster_first_seen.setdefault(name, time.time())
    c.assigned[name] = 0.0  # the report's load now includes the devices sent there
    c.reports += 1
    return 200, {
        "ok": True,
        "cluster": name,
        "token_key": base64.urlsafe_b64encode(c.token_key(name)).decode("ascii"),
        "report_interval_s": c.config.report_interval_s,
    }


@route("GET", "/v1/clusters")
async def clusters(c: Central, req: Request) -> tuple[int, Any]:
    await c.authenticate(req, "operator")
    req.no_body()
    return 200, {"clusters": c.live_clusters(), "report_interval_s": c.config.report_interval_s}


@route("GET", "/v1/status")
async def status(c: Central, req: Request) -> tuple[int, Any]:
    await c.authenticate(req, "operator")
    req.no_body()
    return 200, await c.status()


@route("POST", "/v1/accounts")
async def add_account(c: Central, req: Request) -> tuple[int, Any]:
    operator = await c.authenticate(req, "operator")
    doc = req.json()
    kind = _kind(_str(doc, "kind") or "")
    name = _name(_str(doc, "name") or "", "name")
    password = doc.get("password")
    why = passwords.check_new_password(password)
    if why:
        raise HttpError(400, why)
    assert isinstance(password, str)
    try:
        await c.store.add_account(kind, name, await c._hash(password))
    except AccountExists as e:
        raise HttpError(409, str(e)) from None
    log.info("operator %r added %s account %r", operator, kind, name)
    return 201, {"kind": kind, "name": name}


@route("GET", "/v1/accounts")
async def list_accounts(c: Central, req: Request) -> tuple[int, Any]:
    await c.authenticate(req, "operator")
    req.no_body()
    kind = req.query.get("kind")
    if kind is not None:
        _kind(kind)
    rows = await c.store.list_accounts(kind)
    return 200, {"accounts": [{"kind": r.kind, "name": r.name, "created_at": r.created_at} for r in rows]}


@route("DELETE", "/v1/accounts/{kind}/{name}")
async def remove_account(c: Central, req: Request) -> tuple[int, Any]:
    operator = await c.authenticate(req, "operator")
    req.no_body()
    kind = _kind(req.params["kind"])
    name = req.params["name"]
    if kind == "operator" and await c.store.count_accounts("operator") <= 1:
        if await c.store.password_hash(kind, name) is not None:
            raise HttpError(409, "refusing to remove the last operator account")
    if not await c.store.remove_account(kind, name):
        raise HttpError(404, f"no {kind} account named {name!r}")
    c.verified.forget_all()  # its cached credentials stop working here at once
    c._exists.clear()
    if kind == "cluster":
        c.clusters.pop(name, None)
        c.assigned.pop(name, None)
    log.info("operator %r removed %s account %r", operator, kind, name)
    return 200, {"removed": True, "kind": kind, "name": name}


@route("POST", "/v1/devices/{name}/commands")
async def post_command(c: Central, req: Request) -> tuple[int, Any]:
    operator = await c.authenticate(req, "operator")
    device = _name(req.params["name"], "device")
    doc = req.json()
    command = _str(doc, "command", max_len=128)
    args = doc.get("args", {})
    if not isinstance(args, dict):
        raise HttpError(400, "field 'args' must be a JSON object")
    assert command is not None
    if await c.store.password_hash("device", device) is None:
        raise HttpError(404, f"no device account named {device!r}")
    cid = await c.store.add_command(device, command, args, operator)
    c._wake(device)
    return 201, {"id": cid, "device": device, "command": command}


@route("GET", "/v1/commands")
async def get_commands(c: Central, req: Request) -> tuple[int, Any]:
    device = await c.authenticate(req, "device", allow_session=True)
    req.no_body()
    c.seen(device)
    raw = req.query.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        raise HttpError(400, f"query 'wait' must be a number of seconds, not {raw!r}") from None
    if not 0 <= wait <= c.config.max_wait_s:
        raise HttpError(400, f"query 'wait' must be between 0 and {c.config.max_wait_s:g} seconds")
    cmds = await c.wait_for_commands(device, wait)
    c.seen(device)
    return 200, {"commands": cmds}


@route("POST", "/v1/commands/{id}/ack")
async def ack_command(c: Central, req: Request) -> tuple[int, Any]:
    device = await c.authenticate(req, "device", allow_session=True)
    try:
        cid = int(req.params["id"])
    except ValueError:
        raise HttpError(400, f"command id must be an integer, not {req.params['id']!r}") from None
    result: Any = None
    if req.body.strip():
        result = req.json().get("result")
    if not await c.store.ack_command(device, cid, result):
        raise HttpError(404, f"no unacknowledged command {cid} for device {device!r}")
    c.seen(device)
    return 200, {"ok": True, "id": cid}


def endpoint_list() -> list[tuple[str, str]]:
    """Every (method, path) the server answers; the OpenAPI test checks each is documented."""
    return [(r.method, r.pattern) for r in ROUTES]
