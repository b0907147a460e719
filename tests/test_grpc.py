"""The gateway's gRPC front against tritonclient.grpc, unchanged: sync, asyncio and streaming
inference through a real gateway and worker, metadata and readiness, the repository extension,
credentials, bounds, and the refusals at the wrong port."""

import asyncio
import queue
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

grpcclient = pytest.importorskip("tritonclient.grpc")
import tritonclient.grpc.aio as aioclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


def _echo_inputs(x: np.ndarray) -> list:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def _headers(lc) -> dict:
    return {"authorization": f"Bearer {lc.api_key}"}


@pytest.fixture
def echo(cluster, model_repo):
    lc = cluster()
    lc.add_worker("echo", repo=model_repo)
    lc.wait_workers("echo", 1)
    assert lc.grpc_port, "the gateway serves gRPC"
    return lc


def test_sync_infer_metadata_and_readiness(echo):
    lc = echo
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{lc.grpc_port}")
    h = _headers(lc)
    assert c.is_server_live()  # liveness needs no credentials
    assert c.is_server_ready(headers=h) and c.is_model_ready("echo", headers=h)
    meta = c.get_model_metadata("echo", headers=h)
    assert meta.name == "echo" and meta.inputs[0].name == "x" and meta.outputs[0].name == "y"
    assert c.get_server_metadata(headers=h).name == "shoal"
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    r = c.infer("echo", _echo_inputs(x), headers=h, request_id="r-1")
    np.testing.assert_array_equal(r.as_numpy("y"), x)
    assert r.get_response().id == "r-1"
    # Named outputs, and many calls on one channel.
    for i in range(50):
        x = np.full((1, 4), i, np.float32)
        out = c.infer("echo", _echo_inputs(x), outputs=[grpcclient.InferRequestedOutput("y")], headers=h)
        assert float(out.as_numpy("y")[0, 0]) == i
    # Configuration and statistics (tests/test_front_stats.py has the rest).
    assert c.get_model_config("echo", headers=h).config.max_batch_size == 256
    (stats,) = c.get_inference_statistics("echo", headers=h).model_stats
    assert stats.inference_stats.success.count >= 51
    c.close()


def test_refusals(echo):
    lc = echo
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{lc.grpc_port}")
    x = np.ones((1, 4), np.float32)
    with pytest.raises(InferenceServerException) as e:  # no token
        c.infer("echo", _echo_inputs(x))
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as e:
        c.is_server_ready(headers={"authorization": "Bearer wrong"})
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    h = _headers(lc)
    with pytest.raises(InferenceServerException) as e:  # not a model name
        c.infer("../etc/passwd", _echo_inputs(x), headers=h)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "name" in e.value.message()
    with pytest.raises(InferenceServerException) as e:  # no such model
        c.infer("no-such-model", _echo_inputs(x), headers=h)
    assert e.value.status() in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE")
    with pytest.raises(InferenceServerException) as e:  # the wrong datatype
        inp = grpcclient.InferInput("x", [1, 4], "INT32")
        inp.set_data_from_numpy(np.ones((1, 4), np.int32))
        c.infer("echo", [inp], headers=h)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "FP32" in e.value.message()
    c.close()


def test_too_large_a_request_is_refused(cluster, model_repo):
    lc = cluster(gateway_args=["--max-body-mb", "1"])
    lc.add_worker("echo", repo=model_repo)
    lc.wait_workers("echo", 1)
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{lc.grpc_port}")
    x = np.ones((1024, 1024), np.float32)  # 4 MB
    with pytest.raises(InferenceServerException) as e:
        c.infer("echo", _echo_inputs(x), headers=_headers(lc))
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    # The gateway goes on serving.
    small = np.ones((1, 4), np.float32)
    assert c.infer("echo", _echo_inputs(small), headers=_headers(lc)).as_numpy("y").shape == (1, 4)
    c.close()


def test_async_infer(echo):
    lc = echo

    async def run() -> list[float]:
        c = aioclient.InferenceServerClient(f"127.0.0.1:{lc.grpc_port}")
        try:
            calls = []
            for i in range(64):
                inp = aioclient.InferInput("x", [1, 4], "FP32")
                inp.set_data_from_numpy(np.full((1, 4), i, np.float32))
                calls.append(c.infer("echo", [inp], headers=_headers(lc)))
            results = await asyncio.gather(*calls)
            return [float(r.as_numpy("y")[0, 0]) for r in results]
        finally:
            await c.close()

    assert asyncio.run(run()) == [float(i) for i in range(64)]


def test_streaming_infer(echo):
    lc = echo
    answers: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{lc.grpc_port}")
    c.start_stream(callback=lambda result, error: answers.put((result, error)), headers=_headers(lc))
    for i in range(20):
        c.async_stream_infer("echo", _echo_inputs(np.full((1, 4), i, np.float32)), request_id=str(i))
    c.async_stream_infer("no-such-model", _echo_inputs(np.ones((1, 4), np.float32)), request_id="bad")
    got, errors = {}, []
    for _ in range(21):
        result, error = answers.get(timeout=30)
        if error is not None:
            errors.append(error)
        else:
            got[result.get_response().id] = float(result.as_numpy("y")[0, 0])
    c.stop_stream()
    c.close()
    assert got == {str(i): float(i) for i in range(20)}
    assert len(errors) == 1 and "no-such-model" in str(errors[0])


def test_repository_index_load_unload(cluster, model_repo, tmp_path: Path):
    doc = {
        "autoscale": {
            "engine": "local",
            "repo": str(model_repo),
            "workdir": str(tmp_path / "workers"),
            "interval_s": 0.25,
            "models": {"echo": {"min": 1, "max": 1}},
        }
    }
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    lc = cluster(gateway_args=["--config", str(cfg)])
    lc.wait_workers("echo", 1)
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{lc.grpc_port}")
    h = _headers(lc)
    rows = {m.name: m for m in c.get_model_repository_index(headers=h).models}
    assert rows["echo"].state == "READY" and rows["mnist-cnn"].state == "UNAVAILABLE"
    with pytest.raises(InferenceServerException) as e:
        c.get_model_repository_index()
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    c.unload_model("echo", headers=h)
    end = time.monotonic() + 20
    while lc.live_workers("echo") and time.monotonic() < end:
        time.sleep(0.1)
    assert lc.live_workers("echo") == 0
    with pytest.raises(InferenceServerException) as e:
        c.load_model("no-such-model", headers=h)
    assert e.value.status() == "StatusCode.NOT_FOUND"
    c.load_model("echo", headers=h)
    x = np.ones((1, 4), np.float32)
    assert c.infer("echo", _echo_inputs(x), headers=h).as_numpy("y").shape == (1, 4)
    c.close()


def test_wrong_ports_are_refused_clearly(echo):
    lc = echo
    # A gRPC client at the worker link: refused, and told where gRPC is.
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{lc.worker_port}")
    with pytest.raises(InferenceServerException):
        c.is_server_live()
    c.close()
    # An HTTP client at the worker link: a plain answer saying which port is which.
    with socket.create_connection(("127.0.0.1", lc.worker_port), timeout=5) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    assert b"worker link" in answer and str(lc.grpc_port).encode() in answer, answer
    log = (lc.workdir / f"{lc.name}.log").read_text()
    assert "worker link port" in log


def test_a_worker_at_the_grpc_port_says_so(echo, model_repo):
    lc = echo
    w = lc.spawn(
        "lost",
        ["worker", "--gateway", f"127.0.0.1:{lc.grpc_port}", "--model", "echo", "--repo", str(model_repo)],
        {"SHOAL_CLUSTER_SECRET": lc.secret},
    )
    try:
        end = time.monotonic() + 30
        while "is not a gateway's worker link" not in w.log.read_text() and time.monotonic() < end:
            time.sleep(0.1)
        line = next(x for x in w.log.read_text().splitlines() if "not a gateway's worker link" in x)
        assert "gRPC (8001)" in line and "--workers" in line, line
    finally:
        w.stop()


def test_triton_extensions_not_served_are_unimplemented_and_said_so(cluster):
    """Shared memory, trace and log settings are Triton's, not served here: UNIMPLEMENTED with a
    plain message, and no traceback in the gateway's log."""
    import grpc

    from shoal.protocol.oip_grpc import grpc_service_pb2 as pb
    from shoal.protocol.oip_grpc import grpc_service_pb2_grpc as pbg

    lc = cluster()
    with grpc.insecure_channel(f"127.0.0.1:{lc.grpc_port}") as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        md = [("authorization", f"Bearer {lc.api_key}")]
        for call, request in [
            (stub.LogSettings, pb.LogSettingsRequest()),
            (stub.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest()),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                call(request, metadata=md, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "not served" in e.value.details()
        assert stub.ServerLive(pb.ServerLiveRequest(), metadata=md, timeout=10).live
    assert "Traceback" not in lc.gateway.log.read_text()
