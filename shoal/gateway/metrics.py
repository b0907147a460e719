"""Prometheus metrics of a gateway. Counters and histograms are updated on the request path through
children cached per model version; gauges of live state (workers, in flight, queue) are read only
when Prometheus scrapes, so they cost nothing per request. The collectors of live state are added by
``watch`` once the parts they read exist."""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from shoal.gateway.stats import StatsTable

if TYPE_CHECKING:
    from shoal.autoscale.controller import Autoscaler
    from shoal.gateway.pool import ModelTable, Pending
    from shoal.gateway.storage import ResultStore
    from shoal.protocol.interface import ModelInterface
    from shoal.protocol.link_messages import Result

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class LoopHistogram:
    """A Prometheus histogram by model, observed on the event loop only (the request path's four per
    request): no lock, the bucket found by bisection. prometheus_client's ``Histogram`` takes a lock
    and scans its buckets on each observation: 0.86 µs against 0.18 µs here (docs/benchmarks.md,
    "Half the serving CPU"). Exposed as the same ``_bucket``, ``_count`` and ``_sum`` series."""

    def __init__(self, name: str, documentation: str, label: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = (*(float(b) for b in buckets), float("inf"))
        self.children: dict[str, _LoopHistogramChild] = {}

    def labels(self, value: str) -> _LoopHistogramChild:
        c = self.children.get(value)
        if c is None:
            c = self.children[value] = _LoopHistogramChild(self.bounds)
        return c

    def collect(self) -> Any:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, c in self.children.items():
            total, buckets = 0, []
            for bound, n in zip(self.bounds, c.counts, strict=True):
                total += n
                buckets.append((floatToGoString(bound), total))
            fam.add_metric([value], buckets, c.sum)
        yield fam


class _LoopHistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _LiveState:
    def __init__(self, models: ModelTable) -> None:
        self.models = models

    def collect(self) -> Any:
        workers = GaugeMetricFamily(
            "shoal_workers", "Live workers per model version", labels=["model", "version"]
        )
        queue = GaugeMetricFamily(
            "shoal_queue_depth", "Requests waiting for a worker", labels=["model", "version"]
        )
        ready = GaugeMetricFamily(
            "shoal_model_ready", "1 while a live worker serves the model version", labels=["model", "version"]
        )
        unavailable = GaugeMetricFamily(
            "shoal_model_unavailable",
            "1 while a model version's workers fail to start and it is not retried (load it again once fixed)",
            labels=["model", "version"],
        )
        inflight = GaugeMetricFamily(
            "shoal_worker_in_flight", "Requests held by a worker", labels=["worker", "model", "version"]
        )
        cap = GaugeMetricFamily(
            "shoal_worker_capacity",
            "Requests a worker said it can hold",
            labels=["worker", "model", "version"],
        )
        shed = CounterMetricFamily(
            "shoal_requests_shed",
            "Requests refused at arrival (503): their answer was predicted after their deadline",
            labels=["model", "version"],
        )
        cancelled = CounterMetricFamily(
            "shoal_requests_cancelled",
            "Requests whose client left (disconnected, or cancelled its call) before the answer",
            labels=["model", "version"],
        )
        unread = CounterMetricFamily(
            "shoal_unread_compute_seconds",
            "Model time spent on answers nobody read (the client left or the deadline passed first)",
            labels=["model", "version"],
        )
        for pool in self.models.pools():
            m, v = pool.spec.name, pool.spec.version
            workers.add_metric([m, v], sum(1 for w in pool.workers if w.accepting))
            queue.add_metric([m, v], len(pool.queue))
            ready.add_metric([m, v], 1.0 if pool.ready else 0.0)
            unavailable.add_metric([m, v], 1.0 if pool.unavailable is not None else 0.0)
            shed.add_metric([m, v], pool.shed)
            cancelled.add_metric([m, v], pool.cancelled)
            unread.add_metric([m, v], pool.unread_ms / 1000.0)
            for w in pool.workers:
                inflight.add_metric([w.worker_id, m, v], w.in_flight)
                cap.add_metric([w.worker_id, m, v], w.capacity)
        yield from (workers, queue, ready, unavailable, inflight, cap, shed, cancelled, unread)


class _Autoscale:
    """What the autoscaler decided and from what, per managed model version: the numbers KEDA or the
    HPA act on (``shoal_autoscale_desired_workers``) and the inputs behind them."""

    def __init__(self, models: ModelTable, scaler: Autoscaler | None) -> None:
        self.models = models
        self.scaler = scaler

    def collect(self) -> Any:
        scaler = self.scaler
        asleep = GaugeMetricFamily(
            "shoal_model_asleep",
            "1 while a model version has no worker and one is started for its first request",
            labels=["model", "version"],
        )
        for pool in self.models.pools():
            if pool.wakeable:
                asleep.add_metric([pool.spec.name, pool.spec.version], 1.0 if pool.asleep else 0.0)
        yield asleep
        if scaler is None:
            return
        labels = ["model", "version"]
        fams = {
            "desired": GaugeMetricFamily(
                "shoal_autoscale_desired_workers", "Workers the autoscaling policy wants", labels=labels
            ),
            "load_workers": GaugeMetricFamily(
                "shoal_autoscale_demand_workers", "Load in workers, the policy's input", labels=labels
            ),
            "ready": GaugeMetricFamily("shoal_autoscale_ready_workers", "Workers taking requests", labels=labels),
            "starting": GaugeMetricFamily(
                "shoal_autoscale_starting_workers", "Workers launched, not joined yet", labels=labels
            ),
        }
        for m in scaler.managed.values():
            d = scaler.describe_model(m)
            for k, fam in fams.items():
                fam.add_metric([m.name, m.version], float(d[k]))
        yield from fams.values()
        events = CounterMetricFamily("shoal_autoscale_events", "Scale events, by kind", labels=["kind"])
        for kind, n in scaler.counts.items():
            events.add_metric([kind], n)
        yield events


class _ResultStats:
    """Result storage counters (``--store-results``), read from the store when Prometheus scrapes."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store

    def collect(self) -> Any:
        s = self.store.stats
        yield CounterMetricFamily(
            "shoal_results_stored", "Requests whose inputs and outputs were stored", value=s["stored"]
        )
        yield CounterMetricFamily(
            "shoal_results_dropped",
            "Requests not stored because the storage queue was full",
            value=s["dropped"],
        )
        yield CounterMetricFamily(
            "shoal_results_errors", "Result storage errors (files or database)", value=s["errors"]
        )
        yield GaugeMetricFamily("shoal_results_bytes", "Bytes of stored result files", value=s["bytes"])
        yield GaugeMetricFamily("shoal_results_queued", "Results waiting to be written", value=s["queued"])


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "shoal_requests",
            "Inference requests answered, by model, version and HTTP status",
            ["model", "version", "code"],
            registry=r,
        )
        self.http_errors = Counter(
            "shoal_http_errors", "Requests refused before reaching a model", ["code"], registry=r
        )
        self.latency = LoopHistogram("shoal_request_seconds", "Time from request arrival to response", "model", _LATENCY_BUCKETS)
        r.register(self.latency)
        self.queue = LoopHistogram("shoal_queue_seconds", "Time a request waited for a worker with room", "model", _LATENCY_BUCKETS)
        r.register(self.queue)
        self.compute = LoopHistogram("shoal_compute_seconds", "Model compute time of the batch a request ran in", "model", _LATENCY_BUCKETS)
        r.register(self.compute)
        self.batch = LoopHistogram("shoal_batch_size", "Rows in the batch a request ran in", "model", _BATCH_BUCKETS)
        r.register(self.batch)
        self.retries = Counter(
            "shoal_retries", "Requests sent again after their worker died or refused", ["model"], registry=r
        )
        self.worker_logins = Counter(
            "shoal_worker_logins",
            "Logins on the worker port, by result (ok, failed, throttled, evicted, timeout)",
            ["result"],
            registry=r,
        )
        self.auth_refused = Counter(
            "shoal_auth_refused",
            "HTTP requests refused for their credentials: 401 (none or invalid) or 403 (not allowed)",
            ["code"],
            registry=r,
        )
        self.quota_refused = Counter(
            "shoal_quota_refused",
            "Inference requests refused (429) for their credential's rate limit, by role",
            ["role"],
            registry=r,
        )
        self._children: dict[tuple[str, str], tuple[Any, ...]] = {}
        # Triton's per-model statistics, counted alongside (``stats.py``).
        self.stats = StatsTable()
        self._codes: dict[tuple[str, str, int], Any] = {}

    def watch(self, models: ModelTable, scaler: Autoscaler | None, results: ResultStore | None) -> None:
        """Read live state from these parts when Prometheus scrapes (once they exist)."""
        self.registry.register(_LiveState(models))
        self.registry.register(_Autoscale(models, scaler))
        if results is not None:
            self.registry.register(_ResultStats(results))

    def _model(self, spec: ModelInterface) -> tuple[Any, ...]:
        key = (spec.name, spec.version)
        c = self._children.get(key)
        if c is None:
            m = spec.name
            c = self._children[key] = (
                self.latency.labels(m),
                self.queue.labels(m),
                self.compute.labels(m),
                self.batch.labels(m),
                self.retries.labels(m),
                self.stats.of(spec.name, spec.version),
            )
        return c

    def observe_result(self, spec: ModelInterface, r: Result, p: Pending) -> None:
        _, queue, compute, batch, _, stats = self._model(spec)
        waited = max(0.0, p.t_sent - p.t_enqueued)
        queue.observe(waited)
        if r.compute_ms is not None:
            compute.observe(r.compute_ms / 1000.0)
        if r.batch:
            batch.observe(r.batch)
        stats.result(p.rows, waited, r.batch, r.compute_ms, r.queue_ms, r.input_ms, r.output_ms)

    def count_retry(self, pool: Any) -> None:
        """A request sent again after its worker died or turned it away."""
        self._model(pool.spec)[4].inc()

    def observe_response(self, spec: ModelInterface, code: int, seconds: float) -> None:
        key = (spec.name, spec.version, code)
        c = self._codes.get(key)
        if c is None:
            c = self._codes[key] = self.requests.labels(spec.name, spec.version, str(code))
        c.inc()
        children = self._model(spec)
        children[0].observe(seconds)
        children[5].response(code == 200, seconds)
