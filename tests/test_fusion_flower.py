"""Cooperative learning across sites on Flower's deployment, as real processes on loopback.

One federation runs for the whole module: a SuperLink behind its Fleet gate (TLS, SuperNode
authentication), three enrolled sites whose data is a folder of PNGs, an .npz, and what a real
gateway stored while serving, plus one site that was never enrolled. One site is stopped after the
first round and started again. The ServerApp publishes the fused model as version 2 of the model
the sites' data is shaped for, and a real gateway and worker serve it. Every process is started
here and ended here, by its own handle.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("flwr") is None or importlib.util.find_spec("torch") is None,
    reason="needs flwr and torch (scripts/setup.sh test installs them)",
)

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "shoal" / "bundled" / "models" / "mnist-cnn" / "1"
SITES = ["site-a", "site-b", "site-c"]
ROUNDS, EVERY, HIDDEN, LR, BATCH, SEED = 3, "4steps", [16], 0.01, 10, 3
PER_SITE = 100
DEADLINE_S = 240


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _shoal(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    f = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "shoal", *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
        )
    finally:
        f.close()


def _rounds(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _stored_site_data(tmp: Path, repo: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    """Serve mnist-cnn v1 through a real gateway that stores results; label what it stored."""
    from shoal.local import LocalCluster

    db, folder = tmp / "results.db", tmp / "results"
    lc = LocalCluster(
        tmp / "gw-store",
        name="store",
        gateway_args=["--store-results", f"sqlite:///{db}", "--results-dir", str(folder)],
    )
    lc.start()
    try:
        lc.add_worker("mnist-cnn", repo=str(repo))
        lc.wait_workers("mnist-cnn", 1, timeout=60)
        with lc.client() as c:
            hdr = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "0"}
            for i, img in enumerate(images):
                status, _, _ = c.request(
                    "POST", "/v2/models/mnist-cnn/infer", _png(img), {**hdr, "X-Request-Id": f"c{i}"}
                )
                assert status == 200
    finally:
        lc.stop()  # the gateway writes what is queued before it exits
    csv = tmp / "labels.csv"
    csv.write_text("request_id,label\n" + "".join(f"c{i},{int(y)}\n" for i, y in enumerate(labels)))
    return {"data": f"results:sqlite:///{db}", "results_dir": str(folder), "labels": str(csv)}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from shoal.data import mnist as mnist_data
    from shoal.fusion.federation import flower_env, free_port, make_site_keys, wait_port
    from shoal.security.certs import make_ca, make_cert
    from shoal.train.mnist_models import MEAN, STD

    tmp = tmp_path_factory.mktemp("federation")
    images, labels = mnist_data.load("mnist", "train")
    images, labels = images[: 3 * PER_SITE], labels[: 3 * PER_SITE]
    repo = tmp / "repo"
    shutil.copytree(BUNDLED, repo / "mnist-cnn" / "1")

    # Site a: an .npz of input tensors; site b: a folder of PNGs by label; site c: stored results.
    a_img, b_img, c_img = np.split(images, 3)
    a_y, b_y, c_y = np.split(labels, 3)
    npz = tmp / "site-a.npz"
    np.savez(npz, image=((a_img[:, None] / np.float32(255) - MEAN) / STD).astype(np.float32), label=a_y)
    folder = tmp / "site-b"
    for i, (img, y) in enumerate(zip(b_img, b_y, strict=True)):
        (folder / str(int(y))).mkdir(parents=True, exist_ok=True)
        (folder / str(int(y)) / f"{i}.png").write_bytes(_png(img))
    options = {"site-a": {"data": str(npz)}, "site-b": {"data": str(folder)}}

    pki, keys = tmp / "pki", tmp / "keys"
    make_ca(pki)
    make_cert(pki, "superlink", ["127.0.0.1"], pki)
    for s in [*SITES, "intruder"]:
        make_site_keys(keys, s)
    env = {**flower_env(tmp / "flwr-home"), "PYTHONPATH": str(ROOT)}
    public, private = free_port(), free_port()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    log = tmp / "rounds.jsonl"

    def site(name: str, key: str) -> subprocess.Popen[bytes]:
        opts = options.get(name, options["site-a"])
        args = ["federation", "site", "--superlink", f"127.0.0.1:{public}", "--ca", str(pki / "ca.pem")]
        args += ["--key", str(keys / f"{key}.key"), "--data", opts["data"], "--max-wait", "30"]
        for k in ("results_dir", "labels"):
            if k in opts:
                args += [f"--{k.replace('_', '-')}", opts[k]]
        return _shoal(args, tmp / f"{name}.log", env)

    started: list[subprocess.Popen[bytes]] = []
    try:
        link = _shoal(
            ["federation", "superlink", "--certs", str(pki), "--address", f"127.0.0.1:{public}"]
            + ["--private", f"127.0.0.1:{private}"],
            tmp / "superlink.log",
            env,
        )
        started.append(link)
        options["site-c"] = _stored_site_data(tmp, repo, c_img, c_y)  # while the SuperLink starts
        wait_port("127.0.0.1", public, 60, link)
        enrolling = [
            _shoal(
                ["federation", "enroll", "--superlink", f"127.0.0.1:{private}", "--ca", str(pki / "ca.pem")]
                + ["--name", s, str(keys / f"{s}.pub")],
                tmp / f"enroll-{s}.log",
                env,
            )
            for s in SITES
        ]
        for s, p in zip(SITES, enrolling, strict=True):
            assert p.wait(60) == 0, (tmp / f"enroll-{s}.log").read_text()
        for s in SITES:
            procs[s] = site(s, s)
            started.append(procs[s])
        procs["intruder"] = site("intruder", "intruder")
        started.append(procs["intruder"])
        run = _shoal(
            ["federation", "run", "--superlink", f"127.0.0.1:{private}", "--ca", str(pki / "ca.pem")]
            + ["--sites", *SITES, "--template", str(repo / "mnist-cnn" / "1"), "--rounds", str(ROUNDS)]
            + ["--fuse-every", EVERY, "--hidden", *map(str, HIDDEN), "--lr", str(LR), "--batch", str(BATCH)]
            + ["--seed", str(SEED), "--wait", "60", "--round-wait", "30", "--round-timeout", "90"]
            + ["--log", str(log), "--export", str(repo)],
            tmp / "run.log",
            env,
        )
        started.append(run)
        stopped = restarted = False
        deadline = time.monotonic() + DEADLINE_S
        while run.poll() is None:
            assert time.monotonic() < deadline, (tmp / "run.log").read_text()[-3000:]
            rounds = [r for r in _rounds(log) if "round" in r]
            if rounds and not stopped:
                procs["site-b"].send_signal(signal.SIGTERM)  # the site shuts down after round 1
                procs["site-b"].wait(30)
                stopped = True
            if stopped and not restarted and any("site-b" not in r["sites"] for r in rounds):
                procs["site-b"] = site("site-b", "site-b")  # ... and comes back
                started.append(procs["site-b"])
                restarted = True
            time.sleep(0.1)
        assert run.returncode == 0, (tmp / "run.log").read_text()[-3000:]
        intruder_rc = procs["intruder"].wait(60)
        # Nor can a site enrol itself: the public address serves the Fleet API only.
        tls = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        gate = httpx.post(f"https://127.0.0.1:{public}/v1/control/register-node", content=b"\x00", verify=tls)
        yield {
            "tmp": tmp,
            "repo": repo,
            "log": _rounds(log),
            "options": options,
            "intruder_rc": intruder_rc,
            "gate": (gate.status_code, gate.json()),
        }
    finally:
        for p in started:  # only what this fixture started
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in started:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def test_a_site_drops_out_and_rejoins(federation: Any) -> None:
    rounds = [r for r in federation["log"] if "round" in r]
    assert len(rounds) == ROUNDS
    assert rounds[0]["sites"] == SITES
    gone = [r["round"] for r in rounds if "site-b" not in r["sites"]]
    assert gone and gone[0] >= 2  # stopped after round 1
    assert any("site-b" in r["sites"] for r in rounds if r["round"] > gone[-1])  # and back
    for r in rounds:
        assert all(1 not in pair for pair in r["pairs"]) or 1 in r["peers"]  # no pair with an absent site


def test_a_site_not_enrolled_is_refused(federation: Any) -> None:
    assert federation["intruder_rc"] != 0
    assert "Failed to activate SuperNode" in (federation["tmp"] / "intruder.log").read_text()
    assert all("intruder" not in r.get("sites", []) for r in federation["log"])
    status, body = federation["gate"]
    assert status == 403 and "Fleet API" in body["error"]


def test_fused_weights_follow_the_schedule_on_each_sites_own_data(federation: Any) -> None:
    """Replay the run in one process, round by round with the logged absences: same model."""
    from shoal.fusion import peer
    from shoal.fusion.export import load_template
    from shoal.fusion.sources import load_site
    from shoal.fusion.strategy import PeerFusion
    from shoal.train.publish import run_onnx

    template = load_template(str(federation["repo"] / "mnist-cnn" / "1"))
    data = {
        p: load_site(
            {k.replace("-", "_"): v for k, v in federation["options"][s].items()}, template, p, 3, SEED
        )
        for p, s in enumerate(SITES)
    }
    assert [len(d.y_train) for d in data.values()] == [90, 90, 90]  # 10% of each site's 100 held out
    fusion = PeerFusion(3, "ring", 0.55, "sequential", "twice", EVERY, SEED)
    weights = {
        p: [w.astype(np.float32) for w in peer.init_weights([784, *HIDDEN, 10], SEED)] for p in range(3)
    }
    for r in (r for r in federation["log"] if "round" in r):
        work = fusion.local_work(r["round"] - 1)
        got = {
            p: peer.train_local(data[p], np.arange(90), weights[p], SEED, p, work, LR, BATCH)
            for p in r["peers"]
        }
        weights.update(
            {p: [w.astype(np.float32) for w in ws] for p, ws in fusion.fuse(r["round"] - 1, got).items()}
        )
    consensus = [np.mean(np.stack(ws), axis=0) for ws in zip(*weights.values(), strict=True)]
    x = data[0].x_test.reshape(-1, 1, 28, 28)
    want = x.reshape(len(x), -1) @ consensus[0] + consensus[1]
    want = np.tanh(want) @ consensus[2] + consensus[3]
    got = run_onnx(federation["repo"] / "mnist-cnn" / "2" / "model.onnx", {"image": x})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fused_model_is_published_with_provenance_and_served_as_the_new_version(federation: Any) -> None:
    from shoal.local import LocalCluster
    from shoal.modelrepo.manifest import load_manifest

    m = load_manifest(federation["repo"] / "mnist-cnn" / "2")
    prov = m.provenance
    assert prov["sites"] == SITES and prov["rounds"] == ROUNDS
    assert prov["schedule"]["topology"] == "ring" and prov["schedule"]["every"] == EVERY
    assert 0.0 <= prov["metric"]["accuracy"] <= 1.0 and prov["metric"]["examples"] == 30
    assert set(prov["metric"]["sites"]) <= set(SITES)
    assert m.image is not None and m.inputs[0].shape == (-1, 1, 28, 28)

    lc = LocalCluster(federation["tmp"] / "gw-serve", name="serve")
    lc.start()
    try:
        lc.add_worker("mnist-cnn", repo=str(federation["repo"]))  # no --version: the newest
        lc.wait_workers("mnist-cnn", 1, timeout=60)
        png = next((federation["tmp"] / "site-b").glob("*/*.png")).read_bytes()
        with lc.client() as c:
            hdr = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "0"}
            status, _, body = c.request("POST", "/v2/models/mnist-cnn/infer", png, hdr)
        assert status == 200, body[:300]
        answer = json.loads(body)
        assert answer["model_version"] == "2"
        assert len(answer["outputs"][0]["data"]) == 10
    finally:
        lc.stop()
    assert os.path.getsize(federation["repo"] / "mnist-cnn" / "2" / "model.onnx") > 1000
