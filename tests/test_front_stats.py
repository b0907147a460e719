"""The rest of the Open Inference Protocol's front, through the real clients against a real gateway and
workers: per-model statistics and configuration (tritonclient.http and tritonclient.grpc), the
classification extension (JSON, binary and gRPC), and the extensions ``GET /v2`` lists."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from shoal.local import LocalCluster

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")


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
