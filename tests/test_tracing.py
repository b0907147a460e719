"""Traces: a device's request continues the device's trace through the gateway to the worker, exported
over OTLP/HTTP to a collector (here a receiver in the test that decodes what it is sent, as an
OpenTelemetry collector would), with the gateway's queue and the worker's phases as spans."""

from __future__ import annotations

import gzip
import http.server
import threading
import zlib

import httpx
import pytest
from waiting import wait_for

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
pytest.importorskip("opentelemetry.sdk")

DEVICE_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
DEVICE_SPAN = "00f067aa0ba902b7"


class Collector:
    """An OTLP/HTTP traces receiver on loopback: every span it is sent, decoded."""

    def __init__(self) -> None:
        self.spans: list = []
        spans = self.spans

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
                    for ss in rs.scope_spans:
                        spans.extend(ss.spans)
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
