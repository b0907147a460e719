"""Traces of inference requests, with the OpenTelemetry SDK (``shoal[trace]``), exported over OTLP/HTTP.

Off unless ``--trace-endpoint`` is given, and then imported: the request path checks one attribute and
costs nothing more. A request that comes with a W3C ``traceparent`` (a device's, over HTTP or gRPC
metadata) continues the device's trace and is recorded when the device sampled it; one without is a
new trace, recorded at ``--trace-ratio``. Each recorded request is one span (``infer MODEL``, the
gateway's whole handling) with, per model call (one, or one per pipeline step):

* ``queue``: waiting at the gateway for a worker with room;
* ``worker``: from the request's sending to the worker until its answer arrived, with the worker's
  own phases as children, from the durations its answer reports: ``batch wait`` (in the worker,
  for its batch), ``input`` (decoding images, joining the batch), ``compute`` (the model on the
  batch: its rows are an attribute) and ``output`` (cutting the batch's outputs).

Every span is made by the gateway, on its own clock: the worker's phases are laid end to end, ending
when its answer arrived (the answer's way back is left out), so a worker needs no tracing library,
and clocks of different machines never meet in one trace.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    def __init__(
        self, endpoint: str, service: str, ratio: float = 1.0, exporter: SpanExporter | None = None
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"--trace-ratio must be from 0 to 1, not {ratio}")
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": "shoal-gateway", "shoal.gateway": service}),
            sampler=ParentBased(TraceIdRatioBased(ratio)),
        )
        self.provider.add_span_processor(BatchSpanProcessor(exporter or OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("shoal.gateway")
        # time.monotonic() (the request path's clock) to the epoch nanoseconds spans carry
        self._offset_ns = time.time_ns() - time.monotonic_ns()

    def ns(self, t: float) -> int:
        return int(t * 1e9) + self._offset_ns

    def begin(self, traceparent: str | None, model: str, t0: float) -> RequestTrace | None:
        """The request's span, continuing ``traceparent`` when it has one; None when not recorded."""
        parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
        span = self.tracer.start_span(
            f"infer {model}", parent, SpanKind.SERVER, {"shoal.model": model}, start_time=self.ns(t0)
        )
        if not span.is_recording():
            span.end()
            return None
        return RequestTrace(self, span)

    def close(self) -> None:
        """Send what is still buffered, then stop."""
        self.provider.shutdown()


class RequestTrace:
    """One recorded request: its span, and the model calls' spans under it."""

    __slots__ = ("tracing", "span")

    def __init__(self, tracing: Tracing, span: Any) -> None:
        self.tracing = tracing
        self.span = span

    def model_call(self, p: Any, result: Any, answered: float) -> None:
        """The spans of one model call that was answered: queue, worker and the worker's phases."""
        ns = self.tracing.ns
        tracer = self.tracing.tracer
        ctx = trace.set_span_in_context(self.span)
        spec = p.pool.spec
        attrs = {"shoal.model": spec.name, "shoal.version": spec.version, "shoal.attempts": p.attempts}
        tracer.start_span("queue", ctx, attributes=attrs, start_time=ns(p.t_enqueued)).end(ns(p.t_sent))
        worker = tracer.start_span(
            "worker",
            ctx,
            SpanKind.CLIENT,
            {**attrs, "shoal.worker": p.worker.worker_id if p.worker is not None else ""},
            start_time=ns(p.t_sent),
        )
        wctx = trace.set_span_in_context(worker)
        phases = [
            ("output", result.output_ms, None),
            ("compute", result.compute_ms, {"shoal.batch_rows": result.batch}),
            ("input", result.input_ms, None),
            ("batch wait", result.queue_ms, None),
        ]
        end = answered
        for name, ms, extra in phases:  # laid end to end, backwards from the answer's arrival
            if ms is None:
                continue
            start = max(p.t_sent, end - ms / 1000.0)
            tracer.start_span(name, wctx, attributes=extra, start_time=ns(start)).end(ns(end))
            end = start
        worker.end(ns(answered))

    def end(self, status: int, request_id: str, t: float) -> None:
        span = self.span
        span.set_attribute("shoal.request_id", request_id)
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end(self.tracing.ns(t))
