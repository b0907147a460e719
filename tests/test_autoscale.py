"""Capacity that follows load, with real processes on loopback: the local engine starts and drains
``shoal worker`` processes as a gateway's autoscaler decides, a model at zero is woken by a request,
a model that cannot load is retried with back-off, then marked unavailable until an operator loads
it, and operators load and unload models by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from waiting import wait_for

from shoal.client.http import InferError, OipHttpClient
from shoal.security.tokens import sign_token

BUNDLED = Path(__file__).parent.parent / "shoal" / "bundled" / "models"


def _config(tmp_path: Path, repo: Path, models: dict, **extra) -> Path:
    doc = {"autoscale": {"engine": "local", "repo": str(repo), "workdir": str(tmp_path / "workers"),
                         "interval_s": 0.25, "models": models, **extra}}
    p = tmp_path / "gateway.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _autoscale(lc) -> dict:
    return lc.status()["autoscale"]


def _connected(lc, model: str) -> int:
    """Workers of a model connected to the gateway, draining ones included."""
    return sum(len(m["workers"]) for m in lc.status()["models"] if m["name"] == model)


def _all_served(lc, model: str) -> bool:
    """Every accepting worker of ``model`` has answered a request."""
    workers = [w for m in lc.status()["models"] if m["name"] == model for w in m["workers"] if w["accepting"]]
    return bool(workers) and all(w["served"] > 0 for w in workers)


class Load:
    """Closed-loop clients of the ``slow`` model (50 ms of model time per request, no CPU burnt)."""

    def __init__(self, lc, clients: int, pause_s: float = 0.0) -> None:
        self.lc = lc
        self.pause_s = pause_s
        self.stop = threading.Event()
        self.ok = 0
        self.failed: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        x = {"x": np.full((1, 1), 0.05, np.float32)}
        with self.lc.client(timeout=60) as c:
            while not self.stop.is_set():
                try:
                    c.infer("slow", x)
                    with self.lock:
                        self.ok += 1
                    self.stop.wait(self.pause_s)
                except Exception as e:  # counted; the tests assert there are none
                    with self.lock:
                        self.failed.append(repr(e))

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def out_and_back_in(lc, workers: int, timeout: float = 30) -> list[str]:
    """Load ``slow`` until ``workers`` of it are live and they took traffic, then keep it low until one
    is left (the others drained); the requests that failed."""
    busy = Load(lc, 8)
    try:
        wait_for(lambda: lc.live_workers("slow") >= workers, "no scale-out under load", timeout)
        wait_for(lambda: _all_served(lc, "slow"), "the new workers took no traffic", timeout)
    finally:
        busy.end()
    quiet = Load(lc, 1, pause_s=0.2)  # about a fifth of one worker
    try:
        wait_for(lambda: _connected(lc, "slow") == 1, "no scale-in at low load", timeout)
    finally:
        quiet.end()
    return busy.failed + quiet.failed


def test_workers_follow_the_load_up_and_down_and_nothing_is_lost(cluster, model_repo, tmp_path):
    cfg = _config(tmp_path, model_repo, {"slow": {"min": 1, "max": 3, "scale_up_window_s": 0.5,
                                                  "scale_down_window_s": 2, "cooldown_s": 1}})
    lc = cluster(gateway_args=["--config", str(cfg)])
    lc.wait_workers("slow", 1)
    rounds = 2  # a second round shows it repeats; a third showed nothing more
    for _ in range(rounds):
        assert out_and_back_in(lc, 3) == []
    st = lc.status()
    counts = st["autoscale"]["counts"]
    assert counts["up"] >= rounds and counts["down"] >= rounds
    gone = [d for d in st["departed_workers"] if d["model"] == "slow"]
    assert len(gone) >= 2 * rounds
    assert all(d["left"] == "worker said goodbye" for d in gone)  # drained, never dropped
    assert sum(d["served"] for d in gone) > 0  # scaled-out workers took traffic before leaving


def test_a_model_at_zero_is_woken_by_its_first_request_and_sleeps_again(cluster, model_repo, tmp_path):
    cfg = _config(tmp_path, model_repo, {"checksum": {"min": 0, "max": 2, "idle_to_zero_s": 2,
                                                      "scale_down_window_s": 2, "cooldown_s": 0.5}})
    lc = cluster(gateway_args=["--config", str(cfg)])
    with lc.client() as c:
        assert c.get_json("/v2/health/ready") == (200, {"ready": True})  # asleep counts as servable
        model = next(m for m in lc.status()["models"] if m["name"] == "checksum")
        assert model["asleep"] and model["workers"] == []
        out = c.infer("checksum", {"data": np.arange(5, dtype=np.uint8).reshape(1, 5)})
        assert int(out["sum"][0]) == 10
        assert _autoscale(lc)["counts"]["wake"] == 1
        wait_for(lambda: next(m for m in lc.status()["models"] if m["name"] == "checksum")["asleep"], "the model never went back to sleep", 30)
        assert _autoscale(lc)["counts"]["sleep"] >= 1
        assert int(c.infer("checksum", {"data": np.ones((1, 3), np.uint8)})["sum"][0]) == 3
        assert _autoscale(lc)["counts"]["wake"] == 2


def test_a_model_that_cannot_load_is_marked_unavailable_until_an_operator_loads_it(cluster, tmp_path):
    """A truncated ONNX file: its workers exit before joining. After three failed starts, spaced by
    back-off, the model is UNAVAILABLE with the reason (index, status, metrics), its requests get 503
    with that reason at once, nothing is started again, and an operator's load retries it."""
    repo = tmp_path / "repo"
    for m in ("mnist-cnn", "echo"):
        shutil.copytree(BUNDLED / m, repo / m)
    good = (repo / "mnist-cnn" / "1" / "model.onnx").read_bytes()
    (repo / "mnist-cnn" / "1" / "model.onnx").write_bytes(good[: len(good) // 3])
    cfg = _config(tmp_path, repo, {"mnist-cnn": {"min": 1, "max": 2}, "echo": {"min": 0, "max": 1,
                                                                              "idle_to_zero_s": 60}})
    lc = cluster(gateway_args=["--config", str(cfg)])
    t0 = time.monotonic()
    st = wait_for(lambda: (m := _autoscale(lc)["models"]["mnist-cnn:1"])["unavailable"] and m, "the model that cannot load was not marked unavailable", 90)
    elapsed = time.monotonic() - t0
    assert st["start_failures"] == 3 and "failed to start 3 times" in st["unavailable"], st
    assert "before joining" in st["unavailable"] and "log:" in st["unavailable"]
    assert elapsed >= 3.0  # back-off: 1 + 2 s between the three attempts, not a crash loop
    launched = len(list((tmp_path / "workers").glob("*mnist-cnn*.log")))
    assert launched == 3
    x = {"image": np.zeros((1, 1, 28, 28), np.float32)}
    with lc.client() as c:
        with pytest.raises(InferError) as e:
            c.infer("mnist-cnn", x)
        assert e.value.status == 503 and "failed to start 3 times" in str(e.value)
        rows = {r["name"]: r for r in json.loads(c.request("POST", "/v2/repository/index")[2])}
        assert rows["mnist-cnn"]["state"] == "UNAVAILABLE" and "failed to start" in rows["mnist-cnn"]["reason"]
        assert 'shoal_model_unavailable{model="mnist-cnn",version="1"} 1.0' in c.request("GET", "/metrics")[2].decode()
        # The autoscaler goes on ticking (it wakes echo) and starts nothing more for the broken model.
        assert c.infer("echo", {"x": np.ones((1, 2), np.float32)})["y"].shape == (1, 2)
        assert len(list((tmp_path / "workers").glob("*mnist-cnn*.log"))) == launched
        # An operator's load tries again; it fails the same way and says why, as Triton does.
        code, _, body = c.request("POST", "/v2/repository/models/mnist-cnn/load")
        assert code == 400 and b"failed to load 'mnist-cnn'" in body, body
        # Mended, loaded, served.
        (repo / "mnist-cnn" / "1" / "model.onnx").write_bytes(good)
        code, _, body = c.request("POST", "/v2/repository/models/mnist-cnn/load")
        assert code == 200, body
        assert c.infer("mnist-cnn", x)["logits"].shape == (1, 10)
    assert lc.gateway.alive()


def test_operators_load_and_unload_models_and_nobody_else_can(cluster, model_repo, tmp_path):
    cfg = _config(tmp_path, model_repo, {"echo": {"min": 1, "max": 2}})
    lc = cluster(gateway_args=["--config", str(cfg), "--token-key", "tk"])
    lc.wait_workers("echo", 1)
    device = sign_token({"aud": "cluster", "sub": "cam", "model": "echo"}, b"tk", ttl_s=60)
    with OipHttpClient(lc.url, device) as dev:
        code, _, body = dev.request("POST", "/v2/repository/models/echo/unload")
        assert code == 403 and b"operator" in body
    with OipHttpClient(lc.url) as anon:
        assert anon.request("POST", "/v2/repository/index")[0] == 401
    with lc.client() as c:
        code, _, body = c.request("POST", "/v2/repository/index")
        rows = {r["name"]: r for r in json.loads(body)}
        assert code == 200 and rows["echo"]["state"] == "READY" and rows["mnist-cnn"]["state"] == "UNAVAILABLE"
        code, _, body = c.request("POST", "/v2/repository/models/no-such-model/load")
        assert code == 404 and b"no-such-model" in body
        assert c.request("POST", "/v2/repository/models/echo/unload")[0] == 200
        assert lc.live_workers("echo") == 0
        with pytest.raises(InferError) as e:
            c.infer("echo", {"x": np.ones((1, 2), np.float32)})
        assert e.value.status == 404 and "unloaded" in str(e.value)
        assert c.request("POST", "/v2/repository/models/echo/load")[0] == 200
        assert c.infer("echo", {"x": np.ones((1, 2), np.float32)})["y"].shape == (1, 2)
        # A model of the repository the configuration did not name: loaded on request.
        code, _, body = c.request("POST", "/v2/repository/models/checksum/load")
        assert code == 200, body
        assert int(c.infer("checksum", {"data": np.ones((1, 4), np.uint8)})["sum"][0]) == 4
    # The same from the command line.
    r = subprocess.run([sys.executable, "-m", "shoal", "models", "unload", "checksum", "--url", lc.url,
                        "--token", lc.api_key], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "unloaded checksum" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "shoal", "models", "list", "--url", lc.url, "--token", lc.api_key],
                       capture_output=True, text=True, timeout=60)
    states = {line.split()[0]: line.split()[2] for line in r.stdout.splitlines()}
    assert r.returncode == 0 and states["echo"] == "READY" and states["checksum"] == "UNAVAILABLE"


@pytest.mark.parametrize(
    "block, message",
    [
        ({"engine": "nope"}, "autoscale.engine"),
        ({"models": {"echo": {"min": 3, "max": 2}}}, "autoscale.models.echo.min: 3 is above max 2"),
        ({"models": {"echo": {"scale_down_window_s": -5}}}, "autoscale.models.echo.scale_down_window_s"),
        ({"models": {"echo": {"min": "one"}}}, "autoscale.models.echo.min: Expected `int`"),
        ({"models": {"no-such-model": {}}}, "autoscale.models.no-such-model"),
    ],
)
def test_an_invalid_autoscale_block_is_refused_naming_the_field(tmp_path, block, message):
    p = tmp_path / "gw.yaml"
    p.write_text(yaml.safe_dump({"autoscale": block}))
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "cluster", "--config", str(p), "--http", "127.0.0.1:0",
         "--workers", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--no-auth", "--state-dir", "none"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "SHOAL_CLUSTER_SECRET": "x"},
    )
    assert r.returncode == 2 and message in r.stderr, r.stdout + r.stderr
