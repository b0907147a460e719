"""What a gateway shows of itself: the Open Inference Protocol's server metadata and shoal's own
``/v2/status``, read from the parts that hold the state (the pools, the worker site, the autoscaler,
the central reporter, the result store). Reads only."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import shoal
from shoal.gateway.pool import RequestFailed
from shoal.modelrepo.versions import version_key

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
        return {"name": "shoal", "version": shoal.__version__, "extensions": self.extensions()}

    def extensions(self) -> list[str]:
        """Exactly the protocol extensions this gateway serves, by Triton's names (and shoal's own)."""
        served = [
            "binary_tensor_data",  # Inference-Header-Content-Length, binary_data_size, binary_data_output
            "classification",  # parameters.classification on a requested output
            "model_configuration",  # GET /v2/models/{m}/config, gRPC ModelConfig
            "model_repository",  # /v2/repository index, load, unload (operators)
            "statistics",  # GET /v2/models/{m}/stats, gRPC ModelStatistics
            "shoal_status",  # GET /v2/status
        ]
        if self.results is not None:
            served.append("shoal_results")  # GET /v2/results (--store-results)
        return served

    def stats_versions(self, model: str, version: str | None) -> list[tuple[str, str]]:
        """The (model, version) pairs a statistics request names: every model version and pipeline
        (``model`` empty), a pipeline, a model's version, or every version of a model."""
        if not model:
            pairs = [(p.spec.name, p.spec.version) for p in self.models.pools()]
            return sorted(pairs + [(n, p.spec.version) for n, p in self.pipelines.items()])
        pipeline = self.pipelines.get(model)
        if pipeline is not None:
            if version is not None and version != pipeline.spec.version:
                raise RequestFailed(f"pipeline '{model}' has no version '{version}'", 404)
            return [(model, pipeline.spec.version)]
        versions = self.models.models.get(model)
        if not versions:
            raise self.models.unknown(model)
        if version is None:
            return [(model, v) for v in sorted(versions, key=version_key)]
        if version not in versions:
            raise RequestFailed(f"model '{model}' has no version '{version}'", 404)
        return [(model, version)]

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
