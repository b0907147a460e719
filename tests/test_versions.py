"""Several versions at once, version policies, and a rolling upgrade under load."""

import json
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import yaml

from shoal.client.http import InferError


@pytest.fixture
def two_version_repo(model_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "echo", repo / "echo")
    v2 = repo / "echo" / "2"
    shutil.copytree(repo / "echo" / "1", v2)
    m = (v2 / "manifest.json").read_text().replace('"version": "1"', '"version": "2"')
    (v2 / "manifest.json").write_text(m)
    return repo


def test_rolling_upgrade_under_load_loses_nothing(cluster, two_version_repo):
    lc = cluster()
    old = [lc.add_worker("echo", repo=two_version_repo, version="1") for _ in range(2)]
    lc.wait_workers("echo", 2, version="1")
    versions_seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def device():
        with lc.client() as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    status, headers, body = c.request(
                        "POST",
                        "/v2/models/echo/infer",
                        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1],"data":[%d]}]}' % i,
                        {"Content-Type": "application/json"},
                    )
                    assert status == 200, body
                    versions_seen.append(__import__("json").loads(body)["model_version"])
                except Exception as e:  # asserted on below
                    failures.append(repr(e))

    def answers_after(n: int, more: int, what: str) -> None:
        """Until ``more`` answers came after the first ``n`` (the devices are served meanwhile)."""
        end = time.monotonic() + 30
        while len(versions_seen) < n + more and not failures:
            assert time.monotonic() < end, f"the devices got no {more} answers {what}"
            time.sleep(0.02)

    threads = [threading.Thread(target=device) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        answers_after(0, 50, "from version 1")
        for _ in range(2):
            lc.add_worker("echo", repo=two_version_repo, version="2")
        lc.wait_workers("echo", 2, version="2")
        answers_after(len(versions_seen), 60, "once version 2 was ready")
        for w in old:
            w.signal(signal.SIGTERM)
        for w in old:
            assert w.popen.wait(15) == 0
        answers_after(len(versions_seen), 50, "after version 1 left")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert versions_seen[0] == "1" and versions_seen[-1] == "2"
    first_two = versions_seen.index("2")
    assert "1" not in versions_seen[first_two + 50 :]  # once v2 is ready, unversioned requests go to it
    assert lc.live_workers("echo", "1") == 0 and lc.live_workers("echo", "2") == 2


def test_version_policy_latest_hides_older_versions(cluster, two_version_repo, tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({"versions": {"echo": {"policy": "latest", "n": 1}}}))
    lc = cluster(gateway_args=["--config", str(cfg)])
    lc.add_worker("echo", repo=two_version_repo, version="1")
    lc.add_worker("echo", repo=two_version_repo, version="2")
    lc.wait_workers("echo", 1, version="1")
    lc.wait_workers("echo", 1, version="2")
    x = {"x": np.ones((1, 2), np.float32)}
    with lc.client() as c:
        assert c.get_json("/v2/models/echo")[1]["versions"] == ["2"]
        assert c.infer("echo", x, version="2")["y"].shape == (1, 2)
        with pytest.raises(InferError) as e:
            c.infer("echo", x, version="1")
        assert e.value.status == 404 and "version policy" in str(e.value)


def test_one_order_of_versions_for_repository_gateway_and_central(tmp_path):
    """With versions 2, 10 and beta, every part of shoal calls 10 the newest: central routes and books
    load for the version the gateway serves."""
    from shoal.central.policy import ClusterInfo, ModelLoad, choose_cluster
    from shoal.gateway.pool import ModelPool, ModelTable
    from shoal.modelrepo.manifest import list_versions
    from shoal.protocol.interface import ModelInterface

    for v in ("2", "10", "beta"):
        (tmp_path / "m" / v).mkdir(parents=True)
        (tmp_path / "m" / v / "manifest.json").write_text(json.dumps({
            "name": "m", "version": v, "runtime": "python", "file": "manifest.json", "handler": "h:H",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
        }))
    assert list_versions(tmp_path, "m")[-1] == "10"

    class Live:
        worker_id, in_flight, capacity, latency_ewma_ms, accepting, max_frame_size = "w", 0, 1, 0.0, True, 1 << 20

        def send_request(self, p):
            pass

    table = ModelTable()
    for v in ("2", "10", "beta"):
        spec = ModelInterface("m", v, (), (), 0, None)
        pool: ModelPool = table.pool_for_worker(spec)
        pool.workers.append(Live())
    assert table.find("m", None).spec.version == "10"
    entries = tuple(ModelLoad("m", v) for v in ("2", "10", "beta"))
    choice = choose_cluster([ClusterInfo("a", "http://a", entries, 0.0)], "m", now=0.0)
    assert choice is not None and choice.entry.version == "10"
