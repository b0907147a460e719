"""Traces: a device's request continues the device's trace through the gateway to the worker, exported
over OTLP/HTTP to a collector (here a receiver in the test that decodes what it is sent, as an
OpenTelemetry collector would), with the gateway's queue and the worker's phases as spans; and from
the device's route call, through central's span of the route, to the same worker's spans."""

from __future__ import annotations

import gzip
import http.server
import threading
import zlib

import httpx
import numpy as np
import pytest
from waiting import wait_for

from shoal.client import Client
from shoal.local import LocalCentral

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
pytest.importorskip("opentelemetry.sdk")

DEVICE_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
DEVICE_SPAN = "00f067aa0ba902b7"


class Collector:
    """An OTLP/HTTP traces receiver on loopback: every span it is sent, decoded."""

    def __init__(self) -> None:
        self.spans: list = []
        self.services: dict[bytes, str] = {}  # span id -> the service.name of the process that sent it
        spans, services = self.spans, self.services

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                enc = self.headers.get("Content-Encoding")
                if enc == "gzip":
                    body = gzip.decompress(body)
                elif enc == "deflate":
                    body = zlib.decompress(body)
                req = trace_service.ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    service = next(
                        (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), ""
                    )
                    for ss in rs.scope_spans:
                        spans.extend(ss.spans)
                        services.update((sp.span_id, service) for sp in ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.close()


def test_one_trace_from_the_device_to_the_worker(cluster, model_repo, collector):
    # Only the device's sampled requests are traced (ratio 0 for the rest).
    lc = cluster("traced", ["--trace-endpoint", collector.url, "--trace-ratio", "0"])
    lc.add_worker("echo", repo=model_repo)
    lc.wait_workers("echo", 1)
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}'
    auth = {"Authorization": f"Bearer {lc.api_key}"}
    with httpx.Client(timeout=30) as c:
        r = c.post(f"{lc.url}/v2/models/echo/infer", content=body,
                   headers={**auth, "traceparent": f"00-{DEVICE_TRACE}-{DEVICE_SPAN}-01", "X-Request-Id": "dev-1"})
        assert r.status_code == 200
        for _ in range(3):  # not sampled by the device, and the ratio is 0: not traced
            assert c.post(f"{lc.url}/v2/models/echo/infer", content=body, headers=auth).status_code == 200
    grpc_trace = _grpc_call(lc)
    lc.gateway.stop()  # a gateway that stops sends what it still holds
    wait_for(lambda: len(collector.spans) >= 14, "the gateway's spans never reached the collector")
    assert {s.trace_id.hex() for s in collector.spans} == {DEVICE_TRACE, grpc_trace}  # the devices' own
    by_grpc = [s for s in collector.spans if s.trace_id.hex() == grpc_trace]
    assert sorted(s.name for s in by_grpc) == sorted(
        ["infer echo", "queue", "worker", "batch wait", "input", "compute", "output"]
    )
    spans = {s.name: s for s in collector.spans if s.trace_id.hex() == DEVICE_TRACE}
    root = spans["infer echo"]
    assert root.parent_span_id.hex() == DEVICE_SPAN
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["shoal.request_id"].string_value == "dev-1"
    assert attrs["http.response.status_code"].int_value == 200
    for name in ("queue", "worker"):
        assert spans[name].parent_span_id == root.span_id
    for name in ("batch wait", "input", "compute", "output"):  # the worker's phases
        s = spans[name]
        assert s.parent_span_id == spans["worker"].span_id
        assert spans["worker"].start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano
        assert s.end_time_unix_nano <= spans["worker"].end_time_unix_nano
    assert root.start_time_unix_nano <= spans["queue"].start_time_unix_nano
    assert spans["worker"].end_time_unix_nano <= root.end_time_unix_nano
    assert len(collector.spans) == 14


def _grpc_call(lc) -> str:
    """One call over gRPC with a traceparent in its metadata; its trace id."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import numpy as np

    trace_id = "0af7651916cd43dd8448eb211c80319c"
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{lc.grpc_port}")
    x = grpcclient.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.ones((1, 2), np.float32))
    headers = {"authorization": f"Bearer {lc.api_key}", "traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
    c.infer("echo", [x], headers=headers)
    c.close()
    return trace_id


GATEWAY_SPANS = ["infer echo", "queue", "worker", "batch wait", "input", "compute", "output"]


def test_one_trace_from_the_devices_route_call_through_central_to_the_worker(tmp_path, model_repo, collector):
    """Central traces every route (ratio 1) and the gateway only requests that come traced (ratio 0):
    a device with a trace of its own finds central's route span and the inference's spans in it; a
    device without one gets central's trace of its route, continued by the request that asked for
    the route, and by no later request (the route is cached; they come untraced)."""
    tracing = ["--trace-endpoint", collector.url]
    central = LocalCentral(tmp_path / "central", extra_args=[*tracing, "--trace-ratio", "1", "--startup-grace", "0"])
    central.start()
    try:
        lc = central.start_cluster(tmp_path / "site", "site", gateway_args=[*tracing, "--trace-ratio", "0"])
        try:
            lc.add_worker("echo", repo=model_repo)
            lc.wait_workers("echo", 1)
            central.wait_routable({"site"}, "echo")
            for device in ("cam-traced", "cam-plain"):
                central.add_account("device", device, "password-" + device)
            x = {"x": np.ones((1, 2), np.float32)}
            with Client(central.url, "cam-traced", "password-cam-traced") as c:
                c.infer("echo", x, traceparent=f"00-{DEVICE_TRACE}-{DEVICE_SPAN}-01")
                c.infer("echo", x)  # the route cached, no trace: not traced anywhere
            with Client(central.url, "cam-plain", "password-cam-plain") as c:
                for _ in range(3):  # the first asks central for the route: central's trace
                    c.infer("echo", x)
        finally:
            lc.stop()  # each stops by sending what it still holds
    finally:
        central.stop()
    wait_for(lambda: len(collector.spans) >= 16, "the spans never reached the collector")
    traces: dict[str, list] = {}
    for s in collector.spans:
        traces.setdefault(s.trace_id.hex(), []).append(s)
    assert len(traces) == 2 and DEVICE_TRACE in traces, {t: [s.name for s in ss] for t, ss in traces.items()}
    for trace_id, spans in traces.items():
        assert sorted(s.name for s in spans) == sorted(["route echo", *GATEWAY_SPANS])
        by_name = {s.name: s for s in spans}
        route, infer = by_name["route echo"], by_name["infer echo"]
        assert collector.services[route.span_id] == "shoal-central"
        assert collector.services[infer.span_id] == "shoal-gateway"
        attrs = {a.key: a.value for a in route.attributes}
        assert attrs["shoal.cluster"].string_value == "site" and attrs["shoal.model"].string_value == "echo"
        assert attrs["shoal.gateway"].string_value == lc.url
        assert attrs["http.response.status_code"].int_value == 200
        if trace_id == DEVICE_TRACE:  # the device's two calls, route then inference, under its span
            assert route.parent_span_id.hex() == DEVICE_SPAN and infer.parent_span_id.hex() == DEVICE_SPAN
        else:  # central's trace: the inference continues the route's span
            assert not route.parent_span_id and infer.parent_span_id == route.span_id
        # The route answered before the inference was sent (clocks of two processes: some slack).
        assert route.end_time_unix_nano <= infer.start_time_unix_nano + 50_000_000
    assert len(collector.spans) == 16
