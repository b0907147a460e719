"""Traces of central's route answers, with the OpenTelemetry SDK (``shoal[trace]``), over OTLP/HTTP.

Off unless ``--trace-endpoint`` is given, and then imported: an untraced operation checks one
attribute. A route request that comes with a W3C ``traceparent`` header continues the device's
trace (recorded when the device sampled it); one without is a new trace, recorded at
``--trace-ratio``. Each recorded route is one span, ``route MODEL``, from the request's arrival to its
answer (credentials checked included), with the cluster, gateway and version chosen as attributes.

The route answer carries that span's ``traceparent`` (``RouteAnswer.traceparent``): the device sends
it on with the inference that asked for the route, and the gateway's ``infer MODEL`` span
(``shoal/gateway/tracing.py``) continues it, so a device that sends no trace of its own still gets one
trace from its route to the worker's compute.
"""

from __future__ import annotations

from typing import Any

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
        self, endpoint: str, replica: str, ratio: float = 1.0, exporter: SpanExporter | None = None
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"--trace-ratio must be from 0 to 1, not {ratio}")
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": "shoal-central", "shoal.central.replica": replica}),
            sampler=ParentBased(TraceIdRatioBased(ratio)),
        )
        self.provider.add_span_processor(BatchSpanProcessor(exporter or OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("shoal.central")

    def begin(self, traceparent: str | None, name: str) -> Any:
        """The operation's span, continuing ``traceparent`` when it has a valid one (an invalid one
        is ignored, as W3C says); None when this one is not recorded."""
        parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
        span = self.tracer.start_span(name, parent, SpanKind.SERVER)
        if not span.is_recording():
            span.end()
            return None
        return span

    @staticmethod
    def traceparent(span: Any) -> str:
        """The W3C ``traceparent`` naming ``span`` as the parent: what the route answer carries."""
        ctx = span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    @staticmethod
    def end(span: Any, status: int) -> None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def close(self) -> None:
        """Send what is still buffered, then stop."""
        self.provider.shutdown()
