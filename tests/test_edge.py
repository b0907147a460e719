"""The device with a model of its own, against real processes: frames compressed on the device and
decoded in the cluster, the same input prepared on both ends, cascade and fastest answering locally
while the cluster is stopped, split placement through a real worker, ``shoal infer --local``, and the
emulated link of ``shoal bench edge`` (network namespaces; skipped where the machine refuses them)."""

from __future__ import annotations

import json
import random
import secrets
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shoal.bench import netns, relay
from shoal.client import Client, LocalModel, encode_frame
from shoal.client import placement as pl
from shoal.client.edge import EdgeError, frame_tensor
from shoal.data.mnist import load_mnist
from shoal.local import LocalCentral

BUNDLED = Path(__file__).resolve().parents[1] / "shoal" / "bundled" / "models"
MLP = BUNDLED / "mnist-mlp" / "1"
FRAME = (640, 480)


def camera(image: np.ndarray, size: tuple[int, int] = FRAME) -> np.ndarray:
    return np.asarray(Image.fromarray(image).convert("RGB").resize(size, Image.BILINEAR))


@pytest.fixture(scope="module")
def site(tmp_path_factory, model_repo):
    """Central, one cluster serving the MNIST CNN and MLP, and a device account."""
    tmp = tmp_path_factory.mktemp("edge")
    central = LocalCentral(tmp / "central").start()
    lc = central.start_cluster(tmp / "site", "site")
    try:
        for m in ("mnist-cnn", "mnist-mlp"):
            lc.add_worker(m, repo=model_repo)
        for m in ("mnist-cnn", "mnist-mlp"):
            lc.wait_workers(m, 1, timeout=60)
            central.wait_routable({"site"}, m)
        password = secrets.token_hex(8)
        central.add_account("device", "cam", password)
        yield central, lc, password, tmp
    finally:
        lc.stop()
        central.stop()


def test_compressed_frames_decode_to_the_same_prediction_as_the_originals(site):
    central, _, password, _ = site
    x, y = load_mnist("test")
    cnn = LocalModel(BUNDLED / "mnist-cnn" / "1")
    spec = cnn.manifest.image
    n, same_jpeg, right = 40, 0, 0
    with Client(central.url, "cam", password) as c:
        for i in range(n):
            frame = camera(x[i])
            # The original: the uncompressed frame, prepared on the device, sent as a tensor.
            original = c.infer("mnist-cnn", {"image": frame_tensor(frame, spec)[None]}).outputs["logits"]
            png = c.infer("mnist-cnn", frame=frame, frame_format="png")
            jpeg = c.infer("mnist-cnn", frame=frame, frame_format="jpeg", quality=90)
            assert png.where == "remote" and png.bytes_up == len(encode_frame(frame, "png"))
            assert jpeg.bytes_up == len(encode_frame(frame, "jpeg", 90)) < frame.nbytes / 20
            np.testing.assert_allclose(png.outputs["logits"], original, atol=1e-4)  # lossless: same input
            same_jpeg += int(jpeg.outputs["logits"].argmax() == original.argmax())
            right += int(int(jpeg.label()) == y[i])
    assert same_jpeg == n  # JPEG at quality 90 moves no prediction on these images
    assert right >= n - 1


def test_the_device_prepares_a_frame_as_the_cluster_does(site):
    central, _, password, _ = site
    x, _ = load_mnist("test")
    with Client(central.url, "cam", password, local=MLP) as c:
        for i in range(10):
            frame = camera(x[100 + i], (333, 251))  # odd size: resized on both ends
            here = c.infer("mnist-mlp", frame=frame, policy="local")
            there = c.infer("mnist-mlp", frame=frame, policy="remote", frame_format="png")
            assert (here.where, here.bytes_up, here.cluster) == ("local", 0, "device")
            assert there.where == "remote" and there.bytes_up > 0
            np.testing.assert_allclose(here.outputs["logits"], there.outputs["logits"], atol=1e-4)


def test_bad_frames_and_policies_are_refused_before_anything_is_sent(site):
    central, _, password, _ = site
    with Client(central.url, "cam", password, local=MLP) as c:
        with pytest.raises(EdgeError, match="uint8"):
            c.infer("mnist-cnn", frame=np.zeros((28, 28), np.float32))
        with pytest.raises(EdgeError, match="quality"):
            c.infer("mnist-cnn", frame=np.zeros((28, 28), np.uint8), quality=0)
        with pytest.raises(pl.PlacementError, match="unknown policy"):
            c.infer("mnist-cnn", frame=np.zeros((28, 28), np.uint8), policy="nearest")
        with pytest.raises(ValueError, match="exactly one"):
            c.infer("mnist-cnn", image=b"x", frame=np.zeros((28, 28), np.uint8))
    with pytest.raises(pl.PlacementError, match="needs a local model"):
        Client(central.url, "cam", password, policy="cascade")


def _send(c: Client, frames: list[np.ndarray], **kw) -> list:
    return [c.infer("mnist-cnn", frame=f, **kw) for f in frames]


def test_cascade_and_fastest_answer_locally_while_the_cluster_is_stopped(site):
    central, lc, password, _ = site
    x, y = load_mnist("test")
    frames = [camera(x[i], (320, 240)) for i in range(6)]
    # threshold 1: cascade sends every request on; a device whose own model measured slow: fastest
    # prefers the cluster. Both go to the cluster while it is there.
    with Client(central.url, "cam", password, local=MLP, policy="cascade", threshold=1.0) as c, \
            Client(central.url, "cam", password, local=MLP, policy="fastest") as f:
        f.edge.measured = pl.Measured(local_times=(5_000.0,) * pl.TIME_WINDOW)
        assert {r.where for r in _send(c, frames)} == {"remote"}
        assert {r.where for r in _send(f, frames)} == {"remote"}
        hp, wp = lc.http_port, lc.worker_port
        lc.gateway.stop()  # the cluster is gone (its gateway stopped)
        for client in (c, f):
            down = _send(client, frames)  # nothing raised
            assert {r.where for r in down} == {"local"}
            assert all(r.fallback and "answered locally" in r.fallback for r in down)
            assert sum(int(r.label()) == y[i] for i, r in enumerate(down)) >= 5  # real answers
            assert not client.edge.measured.link_up
        lc.start(http_port=hp, worker_port=wp)
        lc.wait_workers("mnist-cnn", 1, timeout=60)
        central.wait_routable({"site"}, "mnist-cnn")
        # Back to the cluster at the next probe (one request every PROBE_EVERY_S tries it).
        for client in (c, f):
            end = time.monotonic() + 30
            while time.monotonic() < end:
                if client.infer("mnist-cnn", frame=frames[0]).where == "remote":
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the device never went back to the cluster")
            assert client.edge.measured.link_up


def test_split_sends_features_to_a_worker_running_the_heads(site):
    torch = pytest.importorskip("torch")
    from shoal.multihead import data
    from shoal.multihead.compare import to_input
    from shoal.multihead.models import Classifier, SmallCNN, freeze, make_heads
    from shoal.multihead.split import export_split, split_names

    central, lc, password, tmp = site
    torch.manual_seed(0)
    model = Classifier(freeze(SmallCNN()), make_heads(SmallCNN.features, {k: len(v) for k, v in data.CATEGORIES.items()}))
    test = data.generate("test", 16, seed=0)
    repo = tmp / "split-repo"
    dev_dir, _ = export_split(model, repo, "smallcnn", {"command": "test"}, to_input(test.images[:8]))
    device_name, cluster_name = split_names("smallcnn")
    lc.add_worker(cluster_name, repo=repo)
    lc.wait_workers(cluster_name, 1, timeout=60)
    central.wait_routable({"site"}, cluster_name)
    with Client(central.url, "cam", password, local=dev_dir, policy="split") as c:
        for i in range(4):
            frame = camera(test.images[i], (1280, 720))
            r = c.infer(cluster_name, frame=frame)
            assert r.where == "split" and set(r.outputs) == {"digit", "colour"}
            with torch.no_grad():
                whole = model(torch.from_numpy(frame_tensor(frame, c.edge.local.manifest.image)[None]))
            np.testing.assert_allclose(r.outputs["digit"], whole[0].numpy(), atol=1e-3)
            np.testing.assert_allclose(r.outputs["colour"], whole[1].numpy(), atol=1e-3)
            assert r.bytes_up * 10 <= len(encode_frame(frame, "jpeg", 90))
            assert {"local", "remote", "total"} <= set(r.timings_ms)


def shoal_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shoal", *args], capture_output=True, text=True, timeout=120)


def test_infer_command_runs_a_local_model_and_a_policy(site, tmp_path):
    central, _, password, _ = site
    x, y = load_mnist("test")
    Image.fromarray(x[0]).save(tmp_path / "digit.png")
    np.save(tmp_path / "frame.npy", camera(x[1]))
    r = shoal_cli("infer", "--local", str(MLP), str(tmp_path / "digit.png"), str(tmp_path / "frame.npy"),
                  "--frame-format", "png")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(d["where"], d["bytes_up"], d["labels"]["logits"]) for d in lines] == [
        ("local", 0, str(y[0])), ("local", 0, str(y[1]))]
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "infer", "--central", central.url, "--device", "cam", "--model", "mnist-cnn",
         "--local", str(MLP), "--policy", "cascade", "--threshold", "1.0", str(tmp_path / "frame.npy"),
         "--frame-format", "jpeg", "--quality", "80"],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "SHOAL_DEVICE_PASSWORD": password},
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["where"] == "remote" and d["policy"] == "cascade" and d["labels"]["logits"] == str(y[1])
    assert d["bytes_up"] > 0 and {"local", "encode", "remote", "routing", "total"} <= set(d["timings_ms"])
    # latency_ms is the whole request, on every path; its parts add up to no more than it.
    t = d["timings_ms"]
    assert d["latency_ms"] == t["total"] >= t["local"] + t["encode"] + t["routing"] + t["remote"] - 0.05, d
    assert d["version"] == "1"
    r = shoal_cli("infer", "--local", str(MLP), "--policy", "cascade", str(tmp_path / "digit.png"))
    assert r.returncode == 2 and "needs --model" in r.stderr


def test_relay_keeps_order_and_delays_lost_segments():
    imp = relay.Impairment(delay_ms=20, jitter_ms=10, loss=0.1)
    times, lost = relay.schedule([0.001 * i for i in range(500)], imp, random.Random(1))
    assert times == sorted(times) and all(t >= 0.001 * i for i, t in enumerate(times))
    assert 20 < lost < 80
    assert max(t - 0.001 * i for i, t in enumerate(times)) >= relay.RTO_MIN_S  # a retransmission
    none, lost = relay.schedule([0.0] * 10, relay.Impairment(delay_ms=5), random.Random(1))
    assert none == [0.005] * 10 and lost == 0
    with pytest.raises(ValueError):
        relay.Impairment(loss=1.0)


@pytest.mark.skipif(bool(netns.unavailable()), reason=f"network namespaces: {netns.unavailable()}")
def test_a_device_namespace_reaches_the_cluster_through_the_impaired_link(tmp_path, model_repo):
    pair = netns.VethPair(f"t{random.randrange(10**6)}", subnet=random.randrange(250))
    probe = (
        "import sys, time, httpx\n"
        "url = sys.argv[1]; out = []\n"
        "for _ in range(4):\n"
        "    t = time.perf_counter()\n"
        "    try:\n"
        "        out.append((httpx.get(url, timeout=1.0).status_code, time.perf_counter() - t))\n"
        "    except httpx.HTTPError as e:\n"
        "        out.append((type(e).__name__, time.perf_counter() - t))\n"
        "print(out)\n"
    )
    procs = []
    try:
        pair.create()
        pair.shape(8, 30)
        with pair.inside_cluster():
            server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "8080"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
            procs.append(server)
            ready = tmp_path / "ready"
            procs.append(subprocess.Popen([sys.executable, "-m", "shoal.bench.relay", "--route",
                                           f"{pair.cluster_ip}:9000=127.0.0.1:8080", "--delay-ms", "25",
                                           "--ready", str(ready)]))
            end = time.monotonic() + 20
            while not ready.exists() and time.monotonic() < end:
                time.sleep(0.02)

        def device() -> list:
            r = subprocess.run(pair.in_device([sys.executable, "-c", probe, f"http://{pair.cluster_ip}:9000/"], cpu=0),
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            return eval(r.stdout)  # noqa: S307 (our own probe's printed list)

        up = device()
        assert all(s == 200 for s, _ in up) and min(dt for _, dt in up) >= 0.050  # two 25 ms legs
        pair.set_link(False)
        # Packets vanish: connections time out (or the neighbour is found unreachable), nothing answers.
        assert {s for s, _ in device()} <= {"ConnectTimeout", "ConnectError"}
        pair.set_link(True)
        assert all(s == 200 for s, _ in device())
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        pair.delete()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert pair.cluster_ns not in listed and pair.device_ns not in listed


def test_bench_edge_says_not_run_for_checks_whose_runs_did_not_take_place():
    from shoal.bench.edge import NOT_RUN, targets

    row = {"image": 0, "ms": 5.0, "t": 0.0}
    summary = {"p50_ms": 5.0, "failed": 0, "accuracy": 1.0, "bytes_up_per_request": 100}
    run = {p: {"rows": [row], "summary": summary} for p in ("local", "remote", "fastest")}
    t = targets({"runs": {"wifi-good": run}})  # no outage profile, no cascade sweep, no split
    assert t["no_failure_in_outage"] == NOT_RUN and t["outage_failures"] == NOT_RUN
    assert t["cascade_held"] == NOT_RUN and t["split_held"] == NOT_RUN
    assert t["fastest_within_10pct"] is True
    assert targets({"runs": {}})["fastest_within_10pct"] == NOT_RUN


def test_a_request_over_its_budget_says_so():
    from shoal.client.edge import Edge, run_offline

    x, _ = load_mnist("test")
    edge = Edge(None, MLP, "local")
    r = run_offline(edge.infer("", None, None, camera(x[0]), None, "local", 1e-6))
    assert r.where == "local" and r.fallback and "over the 1e-06 ms budget" in r.fallback
    assert r.latency_ms == r.timings_ms["total"] >= r.timings_ms["local"]
    r = run_offline(edge.infer("", None, None, camera(x[0]), None, "local", 60_000))
    assert r.fallback is None
