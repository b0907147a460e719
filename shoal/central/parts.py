"""What central's handlers and collectors use: its parts, and the views built from them. The server
(``server.py``) makes these and runs them; a handler gets this, never the server."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

import shoal
from shoal.central.auth import Authenticator
from shoal.central.commands import CommandRelay
from shoal.central.config import CentralConfig
from shoal.central.db import Store
from shoal.central.directory import Directory
from shoal.central.keys import Keys
from shoal.central.webhook import Webhook
from shoal.protocol.central_messages import AckedCommand, ReplicaInfo, RouteCounts, Status, WebhookPost

if TYPE_CHECKING:
    from shoal.central.tracing import Tracing


@dataclass
class CentralParts:
    config: CentralConfig
    store: Store
    keys: Keys
    auth: Authenticator
    directory: Directory
    commands: CommandRelay
    replica: str
    page: bytes  # the status page
    started_at: float = field(default_factory=time.time)
    tracing: Tracing | None = None  # route spans exported over OTLP (--trace-endpoint); None: off
    # Made from the parts above, by the server, right after them.
    webhook: Webhook = field(init=False)  # posts ``webhook_post``
    openapi: bytes = field(init=False)  # the OpenAPI document, from the route table
    metrics: CollectorRegistry = field(init=False)  # read from these parts when Prometheus scrapes

    async def status(self) -> Status:
        return Status(
            central=ReplicaInfo(
                self.replica,
                shoal.__version__,
                round(time.time() - self.started_at, 1),
                self.store.dialect,
                self.config.report_interval_s,
            ),
            clusters=self.directory.all_views(),
            devices=self.directory.devices_seen(),
            devices_live=len(self.directory.devices),
            routes=RouteCounts(self.directory.routes_answered, self.directory.routes_unserved),
            reports=self.directory.reports,
            auth_failures=self.auth.failures,
            auth_throttled=self.auth.throttled,
            commands=await self.store.command_counts(),
            webhook=self.webhook.state(),
        )

    def webhook_post(self, acked: list[AckedCommand]) -> WebhookPost:
        return WebhookPost(
            "status", self.replica, time.time(), self.directory.live_views(), len(self.directory.devices), acked
        )
