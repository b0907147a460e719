"""A cluster gateway, as its composition root and lifecycle: it builds the parts (the pools, the
dispatcher that owns them, the request service, the worker site, the HTTP app, metrics, views, the
repository API, the autoscaler, the result store) and hands each the others it uses; it starts and
stops them in order. No request passes through it.

Lifecycle: ``start()`` binds both ports and starts the heartbeat and deadline timers; ``stop()`` stops
reporting to central, stops taking HTTP requests, lets those in flight finish for ``drain_timeout_s``
and fails the rest (503), stops the workers an engine started, then closes the worker links.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import resource
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.aio import cancel_and_wait
from shoal.autoscale.config import AutoscaleConfig
from shoal.gateway.auth import Authenticator, parse_api_key
from shoal.gateway.central_link import CentralConfig, CentralReporter
from shoal.gateway.dispatch import Dispatcher
from shoal.gateway.http_app import HttpApp, HttpLimits
from shoal.gateway.logins import LoginGuard
from shoal.gateway.membership import FolderChannel, Membership, Record
from shoal.gateway.metrics import GatewayMetrics
from shoal.gateway.pipeline import Pipeline, PipelineSpec
from shoal.gateway.pool import ModelTable, Priorities
from shoal.gateway.quotas import Quota, Quotas
from shoal.gateway.repository import RepositoryApi
from shoal.gateway.requests import RequestService
from shoal.gateway.results_api import open_store
from shoal.gateway.state import TokenKeyFile
from shoal.gateway.views import GatewayViews
from shoal.gateway.worker_link import LinkSite, WorkerConnection, announce_peers
from shoal.httpdirect import DirectHttpProtocol
from shoal.httpserver import EmbeddedHttpServer, bind_tcp
from shoal.protocol.central_messages import Operation, ReportAnswer
from shoal.protocol.frames import DEFAULT_MAX_FRAME_SIZE

if TYPE_CHECKING:
    from shoal.autoscale.config import ModelScale
    from shoal.autoscale.controller import Autoscaler
    from shoal.gateway.tracing import Tracing

log = logging.getLogger("shoal.gateway")


@dataclass
class GatewayConfig:
    name: str = "cluster"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    worker_host: str = "127.0.0.1"
    worker_port: int = 8003  # Triton's users expect 8000 HTTP, 8001 gRPC, 8002 metrics: workers next
    grpc_host: str = "127.0.0.1"
    grpc_port: int | None = None  # gRPC (shoal[grpc]) on this port; None: not served (the CLI serves 8001)
    gateway_id: str = ""  # this gateway among the cluster's (default: host:worker port)
    advertise_workers: str = (
        ""  # where workers and other gateways reach the worker port (default: worker_host)
    )
    peers: list[str] = field(
        default_factory=list
    )  # other gateways' worker addresses (names may resolve to several)
    secret: bytes = b""  # cluster secret workers prove they know
    api_keys: list[str] = field(default_factory=list)  # static bearer keys, "role:key" (auth.parse_api_key)
    token_key: bytes | None = None  # key shared with central to verify signed route tokens
    no_auth: bool = False
    max_body_size: int = 64 * 1024 * 1024
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_queue: int = 1024  # requests per model version waiting for a worker before 503
    max_attempts: int = 5  # workers one request may be sent to before it fails
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 10.0  # on stop, requests in flight get this long to finish before 503
    unserved_wait_s: float = 3.0  # how long requests wait for a model that has no live worker
    heartbeat_s: float = 1.0
    dead_after_s: float = 5.0
    tls_cert: str | None = None
    tls_key: str | None = None
    backlog: int = 4096
    reuse_port: bool = False  # share the HTTP port with the machine's other gateway processes
    read_timeout_s: float = 30.0  # a client must send a whole request within this (408 after)
    central: CentralConfig | None = None  # report to central (and get the route-token key from it)
    pipelines: dict[str, PipelineSpec] = field(default_factory=dict)
    version_policies: dict[str, Any] = field(default_factory=dict)  # model -> parsed version policy
    priorities: Priorities = field(default_factory=Priorities)  # levels and default levels
    quotas: dict[str, Quota] = field(default_factory=dict)  # role or account -> its rate limit
    trace_endpoint: str | None = None  # OTLP/HTTP traces endpoint: traces on (shoal[trace])
    trace_ratio: float = 1.0  # of requests that come without a traceparent
    results_db: str | None = None  # store requests' inputs and outputs: metadata in this database
    results_dir: str = "shoal-results"  # ... and their tensors as files here
    results_max_age_s: float | None = None
    results_max_bytes: int | None = None
    state_dir: str | None = None  # keeps central's route-token key across restarts (None: not kept)
    autoscale: AutoscaleConfig | None = None  # an engine starts and stops workers by load
    startup_grace_s: float = 10.0  # after start, an unknown model is 503 "not yet" (workers rejoining)
    expected_models: set[str] = field(default_factory=set)  # configured models: 503, never 404, if absent

    def check(self) -> None:
        if not self.secret:
            raise ValueError("the cluster needs a worker secret: --secret or SHOAL_CLUSTER_SECRET")
        if not (self.no_auth or self.api_keys or self.token_key or self.central):
            raise ValueError(
                "devices need credentials: give --api-key (or SHOAL_API_KEYS), --token-key "
                "(or SHOAL_TOKEN_KEY, shared with central), or --no-auth for local development"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        for k in self.api_keys:
            parse_api_key(k)  # raises ValueError naming what is wrong


def raise_fd_limit() -> int:
    """Let one gateway hold many connections: raise the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            pass
    return soft


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        config.check()
        self.config = config
        # The pools and their one owner.
        self.models = ModelTable(
            config.max_queue, config.max_attempts, config.version_policies, config.priorities
        )
        named = {step.model for spec in config.pipelines.values() for step in spec.steps}
        self.models.expect(
            config.expected_models | set(config.version_policies) | named, config.startup_grace_s
        )
        self.dispatcher = Dispatcher(self.models, config.unserved_wait_s)
        self.metrics = GatewayMetrics()
        self.dispatcher.on_retry = self.metrics.count_retry
        # The worker side.
        self.logins = LoginGuard(self.metrics)
        self.site = LinkSite(
            name=config.name,
            secret=config.secret,
            models=self.models,
            dispatcher=self.dispatcher,
            logins=self.logins,
            observe_result=self.metrics.observe_result,
            heartbeat_s=config.heartbeat_s,
            dead_after_s=config.dead_after_s,
            max_frame_size=config.max_frame_size,
        )
        # The request path, and what serves and watches it.
        self.pipelines = {
            name: Pipeline(spec, self.models, self.dispatcher) for name, spec in config.pipelines.items()
        }
        self.service = RequestService(self.models, self.dispatcher, self.pipelines, config.max_frame_size)
        self.results = open_store(  # None unless --store-results: the request path checks this
            config.results_db,
            config.results_dir,
            config.results_max_age_s,
            config.results_max_bytes,
            config.name,
        )
        self.membership = Membership("")  # its id once the worker port is bound
        self.channel: FolderChannel | None = None
        self.autoscaler: Autoscaler | None = None
        if config.autoscale is not None:
            self._autoscaler(config.autoscale)
        self.metrics.watch(self.models, self.autoscaler, self.results)
        self.views = GatewayViews(
            config.name, self.models, self.site, self.pipelines, self.autoscaler, self.results
        )
        self.auth = Authenticator(config.api_keys, config.token_key, config.name, config.no_auth)
        self.key_file = (
            TokenKeyFile(config.state_dir, config.name) if config.state_dir and config.central else None
        )
        self.app = HttpApp(
            self.service,
            self.auth,
            self.metrics,
            self.views,
            RepositoryApi(self.models, self.autoscaler, self.manage_model),
            self.results,
            HttpLimits(config.max_body_size, config.request_timeout_s),
            Quotas(config.quotas) if config.quotas else None,
            self._tracing(config),
        )
        self.http_port = 0
        self.worker_port = 0
        self.grpc_port = 0  # 0 while gRPC is not served
        self._grpc: Any = None  # grpc_app.GrpcServer, imported only when asked for (an extra)
        self._worker_server: asyncio.AbstractServer | None = None
        self._http: EmbeddedHttpServer | None = None
        self._tasks: list[asyncio.Task] = []
        self.reporter: CentralReporter | None = None

    @staticmethod
    def _tracing(config: GatewayConfig) -> Tracing | None:
        """Traces exported over OTLP when an endpoint is given (``shoal[trace]``); else none."""
        if not config.trace_endpoint:
            return None
        try:
            from shoal.gateway.tracing import Tracing
        except ImportError as e:
            raise ValueError(f"--trace-endpoint needs shoal[trace] (pip install 'shoal[trace]'): {e}") from None
        return Tracing(config.trace_endpoint, config.gateway_id or config.name, config.trace_ratio)

    def _autoscaler(self, acfg: AutoscaleConfig) -> Autoscaler:
        """The autoscaler and the pools of the versions it manages (a model the repository lacks is a
        ValueError, like any other bad setting)."""
        from shoal.autoscale.controller import Autoscaler
        from shoal.autoscale.engines import make_engine
        from shoal.bundled import bundled_repo

        repo = acfg.repo or str(bundled_repo())
        self.autoscaler = Autoscaler(
            acfg,
            make_engine(acfg),
            self._worker_address,
            self.config.secret,
            repo,
            self.dispatcher,
            self.config.name,
        )
        self.autoscaler.deciding = self.membership.deciding
        self.autoscaler.peer_load = self.membership.peer_load
        self.autoscaler.on_operation = self.membership.record_op
        for name, scale in acfg.models.items():
            self.manage_model(name, scale)
        return self.autoscaler

    def manage_model(self, name: str, scale: ModelScale | None = None) -> None:
        """Put a model version of the engine's repository under the autoscaler: its pool is declared
        from the manifest, so requests are checked and queued before any worker joins."""
        from shoal.autoscale.config import ModelScale
        from shoal.modelrepo.manifest import ManifestError, resolve

        scaler = self.autoscaler
        assert scaler is not None
        scale = scale or ModelScale()
        try:
            _, manifest = resolve(scaler.repo, name, scale.version)
        except ManifestError as e:
            raise ValueError(f"autoscale.models.{name}: {e}") from None
        pool = self.models.declare(manifest.interface(), on_wait=scaler.poke)
        scaler.manage(name, manifest.version, scale, pool, max(2, 2 * manifest.max_batch_size))

    def _worker_address(self) -> str:
        """Where the workers an engine starts dial this gateway (they learn the others from it)."""
        acfg = self.config.autoscale
        if acfg is not None and acfg.worker_gateway:
            return acfg.worker_gateway
        host = self.config.worker_host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{self.worker_port}"

    def advertised_workers(self) -> str:
        """Where workers and the cluster's other gateways reach this gateway's worker port."""
        if self.config.advertise_workers:
            return self.config.advertise_workers
        host = self.config.worker_host
        if host in ("0.0.0.0", "", "::"):
            host = socket.gethostname()
        return f"{host}:{self.worker_port}"

    def record(self) -> Record:
        """What this gateway tells the cluster's others of itself."""
        models = {
            f"{p.spec.name}:{p.spec.version}": [float(len(p.queue)), float(p.in_flight)]
            for p in self.models.pools()
        }
        return Record(
            self.site.gateway_id, self.advertised_workers(), models=models, ops=dict(self.membership.ops)
        )

    def apply_operations(self) -> None:
        """Operators' loads and unloads made at the cluster's other gateways, applied here too."""
        for name, action in self.membership.new_ops():
            scaler = self.autoscaler
            if scaler is None or action not in ("load", "unload"):
                continue
            if not scaler.find(name):
                if action == "unload":
                    continue
                try:
                    self.manage_model(name)
                except ValueError as e:
                    log.warning("cannot load %s as another gateway did: %s", name, e)
                    continue
            log.info("model %s: %s, as at another gateway of the cluster", name, action + "ed")
            scaler.mark(name, action)

    async def _share_folder(self, channel: FolderChannel) -> None:
        while True:
            try:
                channel.step(self.record())
                self.learn_gateways([r.workers for r in self.membership.others.values()])
                self.apply_operations()
            except OSError as e:
                log.warning(
                    "cannot share state with the cluster's other gateways in %s: %s", channel.folder, e
                )
            await asyncio.sleep(self.config.heartbeat_s)

    def central_answer(self, answer: ReportAnswer) -> None:
        """What central says of the cluster's gateways: workers are told of them, the decider and the
        others' load and actions are taken in."""
        self.learn_gateways(self.membership.from_central(answer))
        self.apply_operations()

    def operations(self) -> list[Operation]:
        return [Operation(name, action, at) for name, (action, at) in self.membership.ops.items()]

    def learn_gateways(self, addresses: list[str]) -> None:
        """The cluster's live gateways as central or the shared folder says now, besides this one and
        its ``--peer``s: workers are told of them (and forget those that have gone)."""
        known = {self.advertised_workers(), *self.config.peers} | {a for a in addresses if a}
        if announce_peers(self.site, sorted(known)):
            log.info("cluster %s: gateways at %s", self.config.name, ", ".join(self.site.peers))

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return ctx

    def set_token_key(self, key: bytes, source: str) -> None:
        """The key route tokens are verified with (from central's report answers); kept in the
        state folder so a restarted gateway verifies tokens before central answers again."""
        if key == self.auth.token_key:
            return
        self.auth.set_token_key(key)
        # Which key, without the key: a key left in the state folder by an earlier run shows here.
        log.info("route-token key %s (sha256 prefix) from %s", hashlib.sha256(key).hexdigest()[:12], source)
        if self.key_file is not None and source != self.key_file.path:
            try:
                self.key_file.save(key)
            except OSError as e:
                log.warning("cannot keep the route-token key in %s: %s", self.key_file.path, e)

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        raise_fd_limit()
        if self.auth.undeclared:
            log.warning(
                "%d API key(s) given without a role are treated as operator keys; declare each as "
                "operator:KEY, scrape:KEY or device:MODEL[+MODEL...]:KEY (docs/security.md)",
                self.auth.undeclared,
            )
        if self.key_file is not None and self.auth.token_key is None:
            key = self.key_file.load()
            if key is not None:
                self.set_token_key(key, str(self.key_file.path))
        if self.results is not None:
            await self.results.start()
        loop = asyncio.get_running_loop()
        cfg = self.config
        wsock = bind_tcp(cfg.worker_host, cfg.worker_port, cfg.backlog, cfg.reuse_port)
        self.worker_port = wsock.getsockname()[1]
        self.site.gateway_id = cfg.gateway_id or f"{socket.gethostname()}:{self.worker_port}"
        self.membership.gateway_id = self.site.gateway_id
        announce_peers(self.site, [self.advertised_workers(), *cfg.peers])
        self._worker_server = await loop.create_server(
            lambda: WorkerConnection(self.site), sock=wsock, ssl=self.ssl_context()
        )
        self._http = EmbeddedHttpServer(
            self.app,
            cfg.http_host,
            cfg.http_port,
            cfg.backlog,
            cfg.tls_cert,
            cfg.tls_key,
            read_timeout_s=cfg.read_timeout_s,
            reuse_port=cfg.reuse_port,
            protocol=DirectHttpProtocol,
            direct_app=self.app,  # inference requests, answered without ASGI
        )
        self.http_port = self._http.port
        self.views.http_port, self.views.worker_port = self.http_port, self.worker_port
        self.views.membership = self.membership
        await self._http.start()
        if cfg.grpc_port is not None:
            await self._start_grpc(cfg.grpc_host, cfg.grpc_port)
        grpc_at = f"gRPC is on port {self.grpc_port}" if self.grpc_port else "gRPC is not served"
        self.site.fronts = f"{grpc_at}, HTTP on port {self.http_port}"
        self._tasks = [
            asyncio.create_task(self._heartbeats(), name="heartbeats"),
            asyncio.create_task(self._deadlines(), name="deadlines"),
        ]
        if cfg.central is None and cfg.state_dir and (cfg.peers or cfg.reuse_port):
            # Gateways of this cluster on this machine: they agree through the state folder.
            secret_id = hashlib.sha256(cfg.secret).hexdigest()[:12]
            folder = Path(cfg.state_dir) / f"gateways-{cfg.name}-{secret_id}"
            self.channel = FolderChannel(folder, self.membership, wants_to_decide=self.autoscaler is not None)
            self.channel.step(self.record())  # the decider is known before the autoscaler starts
            self._tasks.append(asyncio.create_task(self._share_folder(self.channel), name="gateways"))
        if self.autoscaler is not None:
            await self.autoscaler.start()
        if cfg.central is not None:
            scheme = "https" if cfg.tls_cert else "http"
            public = cfg.central.public_url or f"{scheme}://{cfg.http_host}:{self.http_port}"
            self.membership.use_central()
            self.reporter = CentralReporter(
                self.models,
                cfg.central,
                public,
                self.set_token_key,
                gateway_id=self.site.gateway_id,
                workers_address=self.advertised_workers(),
                decide=(lambda: True) if self.autoscaler is not None else None,
                on_answer=self.central_answer,
                operations=self.operations,
            )
            self.views.reporter = self.reporter
            self.reporter.start()
        log.info(
            "cluster %s (gateway %s) serving HTTP on %s:%d, workers on %s:%d%s",
            cfg.name,
            self.site.gateway_id,
            cfg.http_host,
            self.http_port,
            cfg.worker_host,
            self.worker_port,
            " (TLS)" if cfg.tls_cert else "",
        )

    async def _start_grpc(self, host: str, port: int) -> None:
        """The gRPC front on the same request path as HTTP, when grpcio is installed."""
        try:
            from shoal.gateway.grpc_app import GrpcFront, GrpcServer
        except ImportError as e:
            log.warning("gRPC not served (%s): pip install 'shoal[grpc]', or --grpc none to say so", e)
            return
        cfg = self.config
        tls = (cfg.tls_cert, cfg.tls_key) if cfg.tls_cert and cfg.tls_key else None
        self._grpc = GrpcServer(
            GrpcFront(self.app), host, port, cfg.max_body_size, cfg.max_frame_size, tls, cfg.reuse_port
        )
        self.grpc_port = await self._grpc.start()
        log.info("cluster %s: gRPC on %s:%d%s", cfg.name, host, self.grpc_port, " (TLS)" if tls else "")

    async def stop(self) -> None:
        if self.reporter is not None:
            await self.reporter.stop()  # central stops sending devices here
        http_stopped = None
        if self._http is not None:  # no new requests; those in flight finish, while timers still run
            http_stopped = asyncio.create_task(self._http.stop(), name="http-stop")
        grpc_stopped = None
        if self._grpc is not None:
            grpc_stopped = asyncio.create_task(self._grpc.stop(self.config.drain_timeout_s), name="grpc-stop")
        await self._drain(self.config.drain_timeout_s)
        self.dispatcher.close(time.monotonic(), "gateway shutting down")
        if http_stopped is not None:
            await http_stopped
        if grpc_stopped is not None:
            await grpc_stopped
        if self.autoscaler is not None:
            await self.autoscaler.stop()  # the workers an engine started here end with the gateway
        await cancel_and_wait(self._tasks)
        if self.channel is not None:
            self.channel.stop()  # another gateway takes the decisions over at once
        if self.results is not None:
            await self.results.stop()  # after the HTTP side: nothing records any more
        if self.app.tracing is not None:
            await asyncio.to_thread(self.app.tracing.close)  # the spans still buffered are sent
        if self._worker_server is not None:
            self._worker_server.close()
        for c in list(self.site.connections):
            if c.transport is not None:
                c.transport.close()
        log.info("cluster %s (gateway %s) stopped", self.config.name, self.site.gateway_id)

    async def _drain(self, timeout_s: float) -> None:
        """Wait until no request is queued or in flight, at most ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while self.dispatcher.pending and time.monotonic() < end:
            await asyncio.sleep(0.02)

    async def _heartbeats(self) -> None:
        # Four times a heartbeat: a worker that falls silent has what it holds sent elsewhere within
        # a quarter heartbeat of ``silent_after_s``; each connection PINGs once a heartbeat.
        while True:
            await asyncio.sleep(self.config.heartbeat_s / 4)
            now = time.monotonic()
            for c in list(self.site.connections):
                c.heartbeat(now)

    async def _deadlines(self) -> None:
        # One sweep every 50 ms instead of a timer per request: cheaper on the hot path, and a
        # deadline is kept to within 50 ms.
        while True:
            await asyncio.sleep(0.05)
            self.dispatcher.expire(time.monotonic())
