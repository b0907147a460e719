"""shoal's own gRPC client (``shoal.client.grpc_client``) and ``shoal infer --url grpc://...`` against
a real gateway and workers: tensors, an encoded image, metadata, and the errors a user meets."""

from __future__ import annotations

import io
import socket

import numpy as np
import pytest

pytest.importorskip("grpc")
from shoal.client.grpc_client import OipGrpcClient, grpc_target  # noqa: E402
from shoal.client.http import InferError  # noqa: E402


def test_addresses():
    assert grpc_target("grpc://gw") == ("gw:8001", False)
    assert grpc_target("grpcs://gw:9001/") == ("gw:9001", True)
    assert grpc_target("grpc://[::1]") == ("[::1]:8001", False)
    with pytest.raises(ValueError, match="grpc://HOST"):
        grpc_target("http://gw:8000")


def test_tensors_images_and_errors(cluster, model_repo):
    lc = cluster()
    lc.add_worker("echo", repo=model_repo)
    lc.add_worker("mnist-cnn", repo=model_repo)
    lc.wait_workers("echo", 1)
    lc.wait_workers("mnist-cnn", 1)
    url = f"grpc://127.0.0.1:{lc.grpc_port}"
    with OipGrpcClient(url, lc.api_key, timeout=30) as c:
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        np.testing.assert_array_equal(c.infer("echo", {"x": x})["y"], x)
        meta = c.metadata("mnist-cnn")
        assert meta["name"] == "mnist-cnn" and meta["inputs"][0]["datatype"]
        from PIL import Image

        png = io.BytesIO()
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(png, "PNG")
        out = c.infer_raw("mnist-cnn", png.getvalue())
        (scores,) = out.values()
        assert scores.shape == (1, 10)
        with pytest.raises(InferError) as e:
            c.infer("echo", {"nope": x})
        assert e.value.status == 400 and "nope" in str(e.value)
    with OipGrpcClient(url, "wrong-key") as c, pytest.raises(InferError) as e:
        c.infer("echo", {"x": x})
    assert e.value.status == 401
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
    s.close()
    with OipGrpcClient(f"grpc://127.0.0.1:{closed}", timeout=5) as c, pytest.raises(ConnectionError):
        c.infer("echo", {"x": x})


def test_shoal_infer_over_grpc(cluster, model_repo, tmp_path):
    import json
    import subprocess
    import sys

    from PIL import Image

    lc = cluster()
    lc.add_worker("mnist-cnn", repo=model_repo)
    lc.wait_workers("mnist-cnn", 1)
    digit = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(digit)
    url = f"grpc://127.0.0.1:{lc.grpc_port}"

    def infer(key: str, at: str = url) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "shoal", "infer", "--url", at, "--token", key, "--model", "mnist-cnn", str(digit)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    ok = infer(lc.api_key)
    assert ok.returncode == 0, ok.stderr
    line = json.loads(ok.stdout.strip().splitlines()[-1])
    assert line["model"] == "mnist-cnn" and line["bytes_up"] > 0, line
    # The class label, from the manifest's labels, as over HTTP (learnt over gRPC by classification).
    over_http = json.loads(infer(lc.api_key, lc.url).stdout.strip().splitlines()[-1])
    assert line["labels"] == over_http["labels"] and set(line["labels"]) == {"logits"}, (line, over_http)
    bad = infer("wrong-key")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "UNAUTHENTICATED" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
