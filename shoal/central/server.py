"""The central directory server: its parts, put together and run (Starlette on uvicorn).

State per replica: the live directory of clusters (from their reports, which go to every replica),
route counts since each cluster's last report, and the devices seen recently. Everything that must
agree between replicas is in the database: accounts, the master secret (so all replicas derive the
same cluster keys and session keys) and commands for devices.

| part | module |
|---|---|
| settings | ``config.py`` |
| the application, the route table, decoding and errors | ``app.py``, ``routes.py`` |
| the OpenAPI document, generated from the route table | ``openapi.py`` |
| credentials, sessions, login throttling | ``auth.py``, ``passwords.py``, ``keys.py`` |
| the live directory of clusters | ``directory.py``, ``policy.py`` |
| commands for devices and their long poll | ``commands.py`` |
| the webhook | ``webhook.py`` |
| traces of routes (``--trace-endpoint``) | ``tracing.py`` |
| the database | ``db.py`` |
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

import shoal
from shoal.aio import cancel_and_wait
from shoal.central.app import build_app
from shoal.central.auth import Authenticator
from shoal.central.commands import CommandRelay
from shoal.central.config import CentralConfig
from shoal.central.db import AccountExists, Store
from shoal.central.directory import Directory
from shoal.central.keys import Keys
from shoal.central.metrics import central_registry
from shoal.central.openapi import openapi_document
from shoal.central.parts import CentralParts
from shoal.central.routes import route_table
from shoal.central.webhook import Webhook
from shoal.database import redact
from shoal.httpserver import EmbeddedHttpServer

if TYPE_CHECKING:
    from shoal.central.tracing import Tracing

log = logging.getLogger("shoal.central")

STATUS_PAGE = Path(__file__).parent / "status.html"

__all__ = ["Central", "CentralConfig", "endpoint_list"]


class Central:
    """The composition root and lifecycle of one replica: it makes the parts (``parts.py``) and the
    application that serves them, opens the database, runs the background tasks."""

    def __init__(self, config: CentralConfig, store: Store | None = None) -> None:
        config.check()
        self.config = config
        self.store = store or Store(config.db_url, timeout_s=config.db_timeout_s)
        self.keys = Keys()
        self.auth = Authenticator(self.store, self.keys, config)
        self.directory = Directory(config)
        self.commands = CommandRelay(self.store, config.command_poll_s)
        replica = uuid.uuid4().hex[:12]
        p = self.parts = CentralParts(
            config,
            self.store,
            self.keys,
            self.auth,
            self.directory,
            self.commands,
            replica=replica,
            page=STATUS_PAGE.read_bytes(),
            tracing=self._tracing(config, replica),
        )
        self.replica = p.replica
        p.webhook = self.webhook = Webhook(
            config.webhook_url, config.webhook_interval_s, config.webhook_timeout_s, p.webhook_post, self.store
        )
        self.routes = route_table(config)
        p.openapi = msgspec.json.encode(openapi_document(self.routes, shoal.__version__))
        p.metrics = central_registry(self.directory, self.auth, self.webhook)
        self.app = build_app(p, self.auth, config.max_body_size, self.routes, self.lifespan, p.tracing)
        self.http_port = 0
        self._http: EmbeddedHttpServer | None = None
        self._running: contextlib.AbstractAsyncContextManager | None = None

    @staticmethod
    def _tracing(config: CentralConfig, replica: str) -> Tracing | None:
        """Route spans exported over OTLP when an endpoint is given (``shoal[trace]``); else none."""
        if not config.trace_endpoint:
            return None
        try:
            from shoal.central.tracing import Tracing
        except ImportError as e:
            raise ValueError(f"--trace-endpoint needs shoal[trace] (pip install 'shoal[trace]'): {e}") from None
        return Tracing(config.trace_endpoint, replica, config.trace_ratio)

    # ------------------------------------------------------------------------------- lifecycle

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """The application's life: the database open and the background tasks running."""
        await self.store.open()
        self.keys.load(await self.store.master_secret())
        await self.commands.start()
        await self._bootstrap()
        running = [
            asyncio.create_task(self.commands.run_poller(), name="command-poller"),
            asyncio.create_task(self.directory.run_sweeper(), name="directory-sweeper"),
            asyncio.create_task(self.webhook.run(), name="webhook"),
        ]
        try:
            yield
        finally:
            self.commands.stop_waiting()
            await cancel_and_wait(running)
            await self.store.close()

    async def _bootstrap(self) -> None:
        if self.config.bootstrap_operator is not None:
            name, password = self.config.bootstrap_operator
            try:
                await self.store.add_account("operator", name, await self.auth.hash(password))
                log.info("created operator account %r", name)
            except AccountExists:
                log.info("operator account %r already exists; left as it is", name)
        if await self.store.count_accounts("operator") == 0:
            log.warning(
                "no operator account yet: add one with 'shoal central accounts add operator NAME' "
                "or start with --bootstrap-operator NAME"
            )

    async def start(self) -> None:
        cfg = self.config
        self._running = self.app.router.lifespan_context(self.app)
        await self._running.__aenter__()
        # Keep-alive longer than a long poll, so devices keep their connection between polls.
        self._http = EmbeddedHttpServer(
            self.app, cfg.http_host, cfg.http_port, cfg.backlog, cfg.tls_cert, cfg.tls_key, keep_alive_s=75
        )
        self.http_port = self._http.port
        await self._http.start()
        self.directory.listening_since = time.monotonic()
        log.info(
            "central %s serving HTTP%s on %s:%d, database %s",
            self.replica,
            "S" if cfg.tls_cert else "",
            cfg.http_host,
            self.http_port,
            redact(cfg.db_url),
        )

    async def stop(self) -> None:
        self.commands.stop_waiting()  # long polls answer now, so the server can close their connections
        if self._http is not None:
            await self._http.stop()
        if self._running is not None:
            await self._running.__aexit__(None, None, None)
            self._running = None
        if self.parts.tracing is not None:
            await asyncio.to_thread(self.parts.tracing.close)  # the spans still buffered are sent
        log.info("central %s stopped", self.replica)


def endpoint_list() -> list[tuple[str, str]]:
    """Every (method, path) central answers; the OpenAPI test checks each is documented."""
    return route_table(CentralConfig()).endpoints()
