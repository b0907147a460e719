"""Prometheus metrics of a central replica, read from its counters when Prometheus scrapes, so they
cost nothing per route."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from shoal.central.auth import Authenticator
    from shoal.central.directory import Directory
    from shoal.central.webhook import Webhook


class _CentralState:
    def __init__(self, directory: Directory, auth: Authenticator, webhook: Webhook) -> None:
        self.directory, self.auth, self.webhook = directory, auth, webhook

    def collect(self) -> Any:
        d, auth, hook = self.directory, self.auth, self.webhook
        routes = CounterMetricFamily("shoal_central_routes", "Route requests answered", labels=["result"])
        routes.add_metric(["ok"], d.routes_answered)
        routes.add_metric(["unserved"], d.routes_unserved)
        yield routes
        yield CounterMetricFamily("shoal_central_reports", "Cluster reports accepted", value=d.reports)
        yield CounterMetricFamily("shoal_central_auth_failures", "Credentials refused", value=auth.failures)
        yield CounterMetricFamily(
            "shoal_central_auth_throttled",
            "Logins refused at once (429) for too many recent failures of the account or address",
            value=auth.throttled,
        )
        hooks = CounterMetricFamily("shoal_central_webhook_posts", "Webhook posts", labels=["result"])
        for k, v in (("sent", hook.sent), ("failed", hook.failed), ("skipped", hook.skipped)):
            hooks.add_metric([k], v)
        yield hooks
        live = d.live(time.monotonic())
        yield GaugeMetricFamily("shoal_central_clusters_live", "Clusters in the route table", value=len(live))
        gateways = GaugeMetricFamily(
            "shoal_central_gateways_live", "Live gateways of each live cluster", labels=["cluster"]
        )
        for x in live:
            gateways.add_metric([x.name], len(x.gateways) or 1)
        yield gateways
        yield GaugeMetricFamily(
            "shoal_central_devices_live", "Devices seen in the last minute", value=len(d.devices)
        )
        load = GaugeMetricFamily(
            "shoal_central_cluster_load",
            "(in flight + queue) / capacity a live cluster reported",
            labels=["cluster", "model", "version"],
        )
        for x in live:
            for m in x.models:
                if m.capacity > 0:
                    load.add_metric([x.name, m.name, m.version], (m.in_flight + m.queue) / m.capacity)
        yield load


def central_registry(directory: Directory, auth: Authenticator, webhook: Webhook) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_CentralState(directory, auth, webhook))  # type: ignore[arg-type]
    return reg
