"""What a gateway shows of itself: the Open Inference Protocol's server metadata and shoal's own
``/v2/status``, read from the parts that hold the state (the pools, the worker site, the autoscaler,
the central reporter, the result store). Reads only."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import shoal

if TYPE_CHECKING:
    from shoal.autoscale.controller import Autoscaler
    from shoal.gateway.central_link import CentralReporter
    from shoal.gateway.membership import Membership
    from shoal.gateway.pipeline import Pipeline
    from shoal.gateway.pool import ModelTable
    from shoal.gateway.storage import ResultStore
    from shoal.gateway.worker_link import LinkSite


class GatewayViews:
    def __init__(
        self,
        name: str,
        models: ModelTable,
        site: LinkSite,
        pipelines: dict[str, Pipeline],
        scaler: Autoscaler | None,
        results: ResultStore | None,
    ) -> None:
        self.name = name
        self.models = models
        self.site = site
        self.pipelines = pipelines
        self.scaler = scaler
        self.results = results
        self.started_at = time.time()
        # Known once the gateway has started: its ports, and its reporter to central.
        self.http_port = 0
        self.worker_port = 0
        self.reporter: CentralReporter | None = None
        self.membership: Membership | None = None

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": "shoal",
            "version": shoal.__version__,
            "extensions": ["binary_tensor_data", "shoal_status"],
        }

    def status(self) -> dict[str, Any]:
        models = []
        for pool in self.models.pools():
            models.append(
                {
                    "name": pool.spec.name,
                    "version": pool.spec.version,
                    "ready": pool.ready,
                    "asleep": pool.asleep,
                    "unloaded": pool.unloaded,
                    "unavailable": pool.unavailable,
                    "queue": len(pool.queue),
                    "in_flight": pool.in_flight,
                    "capacity": pool.capacity,
                    "latency_ms": round(pool.latency_ms(), 3),
                    # Overload: requests refused at arrival for their deadline, requests whose client
                    # left, model time spent on answers nobody read, the measured time per request.
                    "shed": pool.shed,
                    "cancelled": pool.cancelled,
                    "unread_ms": round(pool.unread_ms, 3),
                    "busy_ms": round(pool.busy_ms, 3),
                    "per_request_ms": round(pool.per_request_s * 1e3, 3),
                    "workers": [w.describe() for w in pool.workers],
                }
            )
        return {
            "name": self.name,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "http_port": self.http_port,
            "worker_port": self.worker_port,
            "gateway_id": self.site.gateway_id,
            "gateways": self.site.peers,  # every gateway of the cluster this one knows (worker addresses)
            "membership": self.membership.describe() if self.membership else None,
            "models": models,
            "pipelines": [
                {"name": n, "version": p.spec.version, "ready": p.ready} for n, p in self.pipelines.items()
            ],
            "departed_workers": self.site.departed,
            "autoscale": self.scaler.describe() if self.scaler else None,
            "central": self.reporter.describe() if self.reporter else [],
            "results": self.results.describe() if self.results else None,
        }
