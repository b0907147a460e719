"""The rest of the Open Inference Protocol's front, through the real clients against a real gateway and
workers: per-model statistics and configuration (tritonclient.http and tritonclient.grpc), the
classification extension (JSON, binary and gRPC), and the extensions ``GET /v2`` lists."""

from __future__ import annotations

import time

import httpx
import msgspec
import numpy as np
import pytest

from shoal.gateway.stats import ModelStats
from shoal.local import LocalCluster
from shoal.protocol.classification import ClassificationError, class_count, top_k
from shoal.protocol.frames import MsgType
from shoal.protocol.interface import ModelInterface, TensorSpec
from shoal.protocol.link_messages import Result, Results, decode_header, encode_header
from shoal.protocol.model_config import model_config
from shoal.protocol.oip import ProtocolError, parse_infer_request

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")


# ------------------------------------------------------------------------------ pure parts


def test_top_k_as_triton_writes_it():
    x = np.array([[0.1, 0.9, 0.5, 0.9], [3.0, 1.0, 2.0, 0.0]], np.float32)
    got = top_k(x, 3, batched=True, labels=["a", "b", "c"])
    assert got.shape == (2, 3)
    # Highest first, ties in index order, labels where the list has one.
    assert got[0].tolist() == [b"0.900000:1:b", b"0.900000:3", b"0.500000:2:c"]
    assert got[1].tolist() == [b"3.000000:0:a", b"2.000000:2:c", b"1.000000:1:b"]
    # Integers as integers; a model that does not batch is one entry ([k]); k beyond the classes.
    ints = top_k(np.array([[5, 7]], np.int64), 9, batched=False)
    assert ints.tolist() == [b"7:1", b"5:0"]
    with pytest.raises(ClassificationError):
        top_k(np.array([b"x"], dtype=object), 1, batched=False)
    with pytest.raises(ClassificationError, match="strings"):  # bounded work on the event loop
        top_k(np.zeros((300, 1000), np.float32), 1000, batched=True)
    assert class_count(0, "y") is None and class_count(None, "y") is None and class_count(4, "y") == 4
    for bad in (-1, True, 2.5, "3", 1 << 20):
        with pytest.raises(ClassificationError):
            class_count(bad, "y")


def test_classification_is_parsed_from_the_request():
    body = (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}],'
            b'"outputs":[{"name":"y","parameters":{"classification":2}},{"name":"z"}]}')
    req = parse_infer_request(body, None)
    assert req.outputs is not None and [(o.name, o.classification) for o in req.outputs] == [("y", 2), ("z", None)]
    for params in (b'"three"', b"-1", b"false", b"[]"):
        bad = body.replace(b'{"classification":2}', b'{"classification":' + params + b"}")
        with pytest.raises(ProtocolError):
            parse_infer_request(bad, None)
    with pytest.raises(ProtocolError):  # a falsy non-object is no more 'none' than a truthy one
        parse_infer_request(body.replace(b'{"classification":2}', b"[]"), None)


def test_configuration_of_an_interface():
    spec = ModelInterface(
        "m", "3", (TensorSpec("x", "UINT8", (-1, 4)),), (TensorSpec("y", "BYTES", (-1, 2)),), 8,
        labels={"y": ["a"]}, runtime="torchscript", batch_delay_ms=1.5,
    )
    cfg = model_config(spec)
    assert (cfg["platform"], cfg["backend"], cfg["max_batch_size"]) == ("pytorch_libtorch", "pytorch", 8)
    assert cfg["input"] == [{"name": "x", "data_type": "TYPE_UINT8", "dims": [4]}]
    assert cfg["output"] == [{"name": "y", "data_type": "TYPE_STRING", "dims": [2], "label_filename": "y.labels"}]
    assert cfg["dynamic_batching"] == {"max_queue_delay_microseconds": 1500}
    assert cfg["version_policy"] == {"specific": {"versions": [3]}}
    grpc_tensors = pytest.importorskip("shoal.gateway.grpc_tensors")
    msg = grpc_tensors.model_config_response(cfg).config  # the proto takes the document as it is
    assert msg.max_batch_size == 8 and list(msg.output[0].dims) == [2]


def test_statistics_share_batches_between_their_requests():
    s = ModelStats()
    # One batch of 4 rows made of a 1-row and a 3-row request; then a request alone.
    s.result(1, 0.001, 4, 2.0, 0.5, 0.1, 0.05)
    s.result(3, 0.002, 4, 2.0, 0.5, 0.1, 0.05)
    s.result(2, 0.0, 2, 1.0, None, None, None)  # a worker that reports only the model's time
    s.response(True, 0.01)
    s.response(False, 0.02)
    doc = s.triton("m", "1")
    assert doc["inference_count"] == 6 and doc["execution_count"] == 2
    inf = doc["inference_stats"]
    assert inf["success"] == {"count": 1, "ns": 10_000_000} and inf["fail"] == {"count": 1, "ns": 20_000_000}
    assert inf["queue"] == {"count": 3, "ns": 4_000_000}  # the gateway's wait and the worker's
    assert inf["compute_infer"] == {"count": 3, "ns": 5_000_000}  # each request counts its batch's time
    assert inf["compute_input"]["count"] == 2
    sizes = {b["batch_size"]: b for b in doc["batch_stats"]}
    assert sizes[4]["compute_infer"] == {"count": 1, "ns": 2_000_000}
    assert sizes[2]["compute_infer"] == {"count": 1, "ns": 1_000_000}


def test_result_timings_are_optional_on_the_link():
    """A worker that does not send the new timings is read as before; one that does is read by a
    gateway that does not know them (msgspec ignores fields a structure does not declare)."""
    old = encode_header(Result(7, [], 1.0, 3))
    r = decode_header(MsgType.RESULT, old)
    assert isinstance(r, Result) and r.queue_ms is None and r.compute_ms == 1.0
    new = encode_header(Results([1, 2], [1, 1], [], 1.0, 2, 0.25, 0.5, 0.125))
    r2 = decode_header(MsgType.RESULTS, new)
    assert isinstance(r2, Results) and (r2.queue_ms, r2.input_ms, r2.output_ms) == (0.25, 0.5, 0.125)

    class OldResults(msgspec.Struct):
        ids: list[int]
        rows: list[int]
        outputs: list
        compute_ms: float | None = None
        batch: int = 0

    assert msgspec.msgpack.decode(new, type=OldResults).batch == 2


# --------------------------------------------------------------------------- a real gateway


@pytest.fixture(scope="module")
def lc(tmp_path_factory, model_repo):
    c = LocalCluster(tmp_path_factory.mktemp("front"), name="front").start()
    try:
        for m in ("echo", "mnist-cnn", "slow"):
            c.add_worker(m, repo=model_repo)
        for m in ("echo", "mnist-cnn", "slow"):
            c.wait_workers(m, 1)
        yield c
    finally:
        c.stop()


def _auth(lc) -> dict[str, str]:
    """A new dict each call: tritonclient.http adds its own headers to the one it is given."""
    return {"Authorization": f"Bearer {lc.api_key}"}


def _meta(lc) -> dict[str, str]:
    return {"authorization": f"Bearer {lc.api_key}"}


def _http(lc):
    return httpclient.InferenceServerClient(f"127.0.0.1:{lc.http_port}")


def _grpc(lc):
    return grpcclient.InferenceServerClient(f"127.0.0.1:{lc.grpc_port}")


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)  # JSON BYTES come back as str


def _echo_input(mod, x: np.ndarray):
    inp = mod.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_statistics_count_what_was_served(lc):
    c = _http(lc)
    before = time.time()
    for i in range(6):
        x = np.full((2, 3), i, np.float32)
        r = c.infer("echo", [_echo_input(httpclient, x)], headers=_auth(lc))
        np.testing.assert_array_equal(r.as_numpy("y"), x)
    stats = c.get_inference_statistics("echo", headers=_auth(lc))
    (s,) = stats["model_stats"]
    assert (s["name"], s["version"]) == ("echo", "1")
    assert s["inference_count"] == 12  # rows
    assert 1 <= s["execution_count"] <= 6
    assert before * 1000 - 1000 <= s["last_inference"] <= time.time() * 1000 + 1000
    inf = s["inference_stats"]
    assert inf["success"]["count"] == 6 and inf["success"]["ns"] > 0
    assert inf["fail"] == {"count": 0, "ns": 0}
    for k in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inf[k]["count"] == 6, k  # the worker reports its decode, model and cut times
    assert inf["compute_infer"]["ns"] > 0
    # Each request took well under its measured success time.
    assert inf["compute_infer"]["ns"] < inf["success"]["ns"]
    assert sum(b["compute_infer"]["count"] for b in s["batch_stats"]) == s["execution_count"]
    assert all(b["batch_size"] >= 2 for b in s["batch_stats"])
    # The same figures by version, over gRPC, and in the every-model answer.
    by_version = c.get_inference_statistics("echo", "1", headers=_auth(lc))["model_stats"][0]
    assert by_version["inference_count"] == 12
    g = _grpc(lc)
    gs = g.get_inference_statistics("echo", headers=_meta(lc), as_json=True)["model_stats"][0]
    assert gs["name"] == "echo" and int(gs["inference_count"]) == 12
    assert int(gs["inference_stats"]["success"]["count"]) == 6
    assert int(gs["inference_stats"]["compute_infer"]["ns"]) == inf["compute_infer"]["ns"]
    every = c.get_inference_statistics(headers=_auth(lc))["model_stats"]
    assert {"echo", "mnist-cnn", "slow"} <= {e["name"] for e in every}
    every_grpc = g.get_inference_statistics(headers=_meta(lc), as_json=True)["model_stats"]
    assert {e["name"] for e in every_grpc} == {e["name"] for e in every}
    g.close()
    c.close()


def test_failures_are_counted_with_their_time(lc):
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [0.6]}],
            "parameters": {"timeout_ms": 150}}
    r = httpx.post(f"{lc.url}/v2/models/slow/infer", json=body, headers=_auth(lc), timeout=10)
    assert r.status_code == 504
    r = httpx.get(f"{lc.url}/v2/models/slow/stats", headers=_auth(lc))
    assert r.status_code == 200
    fail = r.json()["model_stats"][0]["inference_stats"]["fail"]
    assert fail["count"] == 1 and fail["ns"] >= 100_000_000


def test_configuration_from_the_manifest(lc):
    c = _http(lc)
    cfg = c.get_model_config("mnist-cnn", headers=_auth(lc))
    assert cfg["name"] == "mnist-cnn" and cfg["platform"] == "onnxruntime_onnx"
    assert cfg["max_batch_size"] == 64
    assert cfg["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}]
    assert cfg["output"][0]["name"] == "logits" and cfg["output"][0]["dims"] == [10]
    assert cfg["output"][0]["data_type"] == "TYPE_FP32"
    assert cfg["dynamic_batching"] == {"max_queue_delay_microseconds": 2000}
    slow = c.get_model_config("slow", "1", headers=_auth(lc))
    assert slow["max_batch_size"] == 0 and "dynamic_batching" not in slow
    assert slow["input"][0]["dims"] == [-1, 1]  # no batch dimension to leave out
    g = _grpc(lc)
    gc = g.get_model_config("mnist-cnn", headers=_meta(lc)).config
    assert gc.name == "mnist-cnn" and gc.max_batch_size == 64 and list(gc.input[0].dims) == [1, 28, 28]
    assert grpcclient.model_config_pb2.DataType.Name(gc.input[0].data_type) == "TYPE_FP32"
    assert gc.dynamic_batching.max_queue_delay_microseconds == 2000
    g.close()
    # Unknown models (503 while the gateway's start-up grace lasts) and versions.
    assert httpx.get(f"{lc.url}/v2/models/nope/config", headers=_auth(lc)).status_code in (404, 503)
    assert httpx.get(f"{lc.url}/v2/models/echo/versions/9/stats", headers=_auth(lc)).status_code == 404
    c.close()


def test_classification_json_binary_and_grpc(lc):
    rng = np.random.default_rng(3)
    img = rng.random((2, 1, 28, 28), dtype=np.float32)
    c = _http(lc)
    inp = httpclient.InferInput("image", list(img.shape), "FP32")
    inp.set_data_from_numpy(img, binary_data=False)
    logits = c.infer("mnist-cnn", [inp], headers=_auth(lc)).as_numpy("logits")
    best = np.argsort(-logits, axis=1, kind="stable")[:, :3]
    for binary in (False, True):
        inp.set_data_from_numpy(img, binary_data=binary)
        out = httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=3)
        r = c.infer("mnist-cnn", [inp], outputs=[out], headers=_auth(lc))
        classes = r.as_numpy("logits")
        assert classes.shape == (2, 3)
        for row in range(2):
            for j in range(3):
                score, index, label = _text(classes[row, j]).split(":")
                assert int(index) == best[row, j] and label == str(best[row, j])
                assert abs(float(score) - logits[row, best[row, j]]) < 1e-5
    g = _grpc(lc)
    gi = grpcclient.InferInput("image", list(img.shape), "FP32")
    gi.set_data_from_numpy(img)
    r = g.infer("mnist-cnn", [gi], outputs=[grpcclient.InferRequestedOutput("logits", class_count=2)], headers=_meta(lc))
    top = r.as_numpy("logits")
    assert top.shape == (2, 2) and _text(top[0, 0]).split(":")[1] == str(best[0, 0])
    g.close()
    # Without labels: score:index; k beyond the classes gives them all.
    x = np.array([[0.1, 0.9, 0.5]], np.float32)
    r = c.infer(
        "echo",
        [_echo_input(httpclient, x)],
        outputs=[httpclient.InferRequestedOutput("y", binary_data=False, class_count=5)],
        headers=_auth(lc),
    )
    assert [_text(v) for v in r.as_numpy("y").reshape(-1)] == ["0.900000:1", "0.500000:2", "0.100000:0"]
    c.close()
    # A count that is not one is refused before anything runs.
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}],
            "outputs": [{"name": "y", "parameters": {"classification": "three"}}]}
    r = httpx.post(f"{lc.url}/v2/models/echo/infer", json=body, headers=_auth(lc))
    assert r.status_code == 400 and "classification" in r.json()["error"]


def test_server_metadata_lists_exactly_what_is_served(lc):
    ext = httpx.get(f"{lc.url}/v2", headers=_auth(lc)).json()["extensions"]
    assert sorted(ext) == sorted(
        ["binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics",
         "shoal_status"]
    )
    g = _grpc(lc)
    assert sorted(g.get_server_metadata(headers=_meta(lc)).extensions) == sorted(ext)
    g.close()
