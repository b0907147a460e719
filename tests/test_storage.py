"""Result storage: the store on SQLite (and PostgreSQL when this machine has one), retention, broken
storage that must never fail a request, and the HTTP API on a real gateway with workers."""

from __future__ import annotations

import asyncio
import io
import time
import types
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from shoal.client.http import InferError, OipHttpClient
from shoal.gateway.storage import ResultStore, writer
from shoal.protocol.oip import build_infer_request


def png(value: int = 200) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), value, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def bytes_tensor(items: list[bytes]) -> np.ndarray:
    a = np.empty(len(items), dtype=object)
    a[:] = items
    return a


async def settle(store: ResultStore) -> None:
    assert await store.flush(10.0), store.stats


def store_in(tmp_path: Path, url: str | None = None, **kw) -> ResultStore:
    return ResultStore(url or f"sqlite:///{tmp_path / 'results.db'}", tmp_path / "files", **kw)


# ------------------------------------------------------------------------------------- the store


async def _round_trip(store: ResultStore) -> None:
    await store.start()
    try:
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        y = (x * 2).astype(np.int64)
        image = png()
        store.record("r1", "echo", "1", {"x": x}, None, {"y": y}, 200, 1.5)
        store.record("r2", "imgstat", "1", {"image": bytes_tensor([image])}, None, {"y": x}, 200, 2.0)
        store.record(
            "r3",
            "echo",
            "2",
            {"s": bytes_tensor([b"a", "b\u00e9".encode()])},
            None,
            None,
            504,
            30000.0,
            "timed out",
        )
        store.record(
            "r4", "raw", "1", None, image, {"label": bytes_tensor([b"seven"])}, 200, 0.5, client="cam-1"
        )
        await settle(store)
        assert store.stats["stored"] == 4 and store.stats["errors"] == 0 and store.stats["dropped"] == 0
        assert store.stats["bytes"] > len(image) * 2

        rows = await store.list()
        assert [r["request_id"] for r in rows] == ["r4", "r3", "r2", "r1"]  # newest first
        assert rows[0]["client"] == "cam-1" and rows[0]["inputs"] == ["raw"]
        assert [r["request_id"] for r in await store.list(model="echo")] == ["r3", "r1"]
        assert [r["request_id"] for r in await store.list(model="echo", version="1")] == ["r1"]
        assert [r["request_id"] for r in await store.list(status=504)] == ["r3"]
        page = await store.list(limit=2)
        assert [r["request_id"] for r in page] == ["r4", "r3"]
        nxt = await store.list(limit=2, before_id=page[-1]["id"])
        assert [r["request_id"] for r in nxt] == ["r2", "r1"]
        t1 = rows[-1]["time"]
        assert [r["request_id"] for r in await store.list(until=t1 + 1e-6)] == ["r1"]
        assert len(await store.list(since=time.time() + 60)) == 0

        got = await store.get("r1")
        assert got is not None and got["status"] == 200 and got["model"] == "echo"
        assert got["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [3, 4], "files": ["x.npy"]}]
        (out,) = got["outputs"]
        assert out["datatype"] == "INT64" and out["shape"] == [3, 4] and out["data"] == y.reshape(-1).tolist()
        back = np.load(io.BytesIO(await store.payload("r1", "input", "x")), allow_pickle=False)
        assert back.dtype == np.float32 and np.array_equal(back, x)
        assert np.array_equal(np.load(io.BytesIO(await store.payload("r1", "output", "y.npy"))), y)

        got = await store.get("r2")
        assert got["inputs"][0]["files"] == ["image.png"]
        assert await store.payload("r2", "input", "image") == image
        name, data = await store.payload_file("r2", "input", "image")
        assert name == "image.png" and Image.open(io.BytesIO(data)).size == (28, 28)

        got = await store.get("r3")
        assert got["error"] == "timed out" and got["outputs"] == []
        assert got["inputs"][0]["files"] == ["s.0.bin", "s.1.bin"]
        assert await store.payload("r3", "input", "s.1.bin") == "b\u00e9".encode()
        assert await store.payload("r3", "input", "s") is None  # two files: ask for one by its name

        got = await store.get("r4")
        assert got["inputs"][0]["files"] == ["raw.png"] and got["outputs"][0]["data"] == ["seven"]
        assert await store.payload("r4", "input", "raw") == image

        assert await store.get("nope") is None
        assert await store.payload("r1", "input", "y") is None
        assert await store.payload("r1", "output", "../results.db") is None
    finally:
        await store.stop()


def test_round_trip_sqlite(tmp_path):
    asyncio.run(_round_trip(store_in(tmp_path, max_age_s=None, max_bytes=None)))


def test_same_request_id_twice_keeps_both_and_get_returns_the_newest(tmp_path):
    async def main() -> None:
        store = store_in(tmp_path, max_age_s=None, max_bytes=None)
        await store.start()
        try:
            for v in (1.0, 2.0):
                store.record("dup", "echo", "1", {"x": np.full((1, 2), v, np.float32)}, None, None, 200, 1.0)
            await settle(store)
            assert len(await store.list(request_id="dup")) == 2
            got = await store.get("dup")
            back = np.load(io.BytesIO(await store.payload("dup", "input", "x")))
            assert got["id"] == (await store.list())[0]["id"] and back[0, 0] == 2.0
            assert got["stored"] == 2  # answered twice (a retry on another gateway looks the same)
        finally:
            await store.stop()

    asyncio.run(main())


def test_retention_by_age_removes_rows_files_and_orphans(tmp_path, monkeypatch):
    async def main() -> None:
        store = store_in(tmp_path, max_age_s=60, max_bytes=None, janitor_s=0.1)
        files = tmp_path / "files"
        orphan = files / "2001010100" / "abc"
        orphan.mkdir(parents=True)
        (orphan / "in-x.npy").write_bytes(b"junk")
        (files / "keep-me").mkdir()  # not an hour folder: never touched
        await store.start()
        try:
            store.record("new", "echo", "1", {"x": np.zeros((1, 4), np.float32)}, None, None, 200, 1.0)
            await settle(store)
            new_file = set(files.rglob("*.results"))
            assert len(new_file) == 1
            # Recorded a day ago (the writer's clock turned back for this one call), not waited for;
            # in a batch (a file) of its own.
            with monkeypatch.context() as m:
                m.setattr(writer, "time", types.SimpleNamespace(time=lambda: time.time() - 86400))
                store.record("old", "echo", "1", {"x": np.zeros((1, 4), np.float32)}, None, None, 200, 1.0)
            await settle(store)
            assert store.stats["stored"] == 2 and store.stats["errors"] == 0
            end = time.monotonic() + 10
            while await store.get("old") is not None:  # the janitor's next round
                assert time.monotonic() < end, "the day-old result was never removed"
                await asyncio.sleep(0.05)
            assert set(files.rglob("*.results")) == new_file  # the old one's file went with its row
            assert [r["request_id"] for r in await store.list()] == ["new"]
            assert not orphan.parent.exists() and (files / "keep-me").is_dir()
            assert store.stats["errors"] == 0
        finally:
            await store.stop()

    asyncio.run(main())


def test_retention_by_size_keeps_the_newest(tmp_path):
    async def main() -> None:
        x = np.zeros((1, 1000), np.float32)  # 4000 bytes + the .npy header
        store = store_in(tmp_path, max_age_s=None, max_bytes=3 * 4200, janitor_s=3600)
        await store.start()
        try:
            for i in range(10):  # one write batch (one file) each
                store.record(f"r{i}", "echo", "1", {"x": x}, None, None, 200, 1.0)
                await settle(store)
            assert store.stats["bytes"] > 10 * 4000
            assert await store.enforce_retention() == 7
            assert [r["request_id"] for r in await store.list()] == ["r9", "r8", "r7"]
            assert store.stats["bytes"] <= 3 * 4200
            assert len(list((tmp_path / "files").rglob("*.results"))) == 3
            # Requests written together (one file) go together: room for one request leaves none
            # when the newest two share a file.
            for i in range(10, 12):
                store.record(f"r{i}", "echo", "1", {"x": x}, None, None, 200, 1.0)
            await settle(store)
            store.max_bytes = 4200
            assert await store.enforce_retention() == 5
            assert await store.list() == [] and store.stats["bytes"] == 0
            assert list((tmp_path / "files").rglob("*.results")) == []
            store.max_bytes = 3 * 4200
            store.record("r12", "echo", "1", {"x": x}, None, None, 200, 1.0)
            await settle(store)
            assert 4000 < store.stats["bytes"] < 4200
        finally:
            await store.stop()
        # A restarted store finds the total it had.
        again = store_in(tmp_path, max_age_s=None, max_bytes=None)
        await again.start()
        try:
            assert again.stats["bytes"] == store.stats["bytes"]
        finally:
            await again.stop()

    asyncio.run(main())


def test_broken_folder_and_database_count_errors_and_never_raise(tmp_path):
    async def main() -> None:
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file where the folder should be")
        store = ResultStore(f"sqlite:///{tmp_path / 'r.db'}", blocker, None, None)
        await store.start()  # logs and goes on
        try:
            for i in range(5):
                store.record(f"r{i}", "echo", "1", {"x": np.zeros((1, 4), np.float32)}, None, None, 200, 1.0)
            await settle(store)
            assert store.stats["stored"] == 0 and store.stats["errors"] >= 5
        finally:
            await store.stop()

        # A database that cannot be opened: the files written for the batch are taken back.
        bad_db = ResultStore(f"sqlite:///{blocker}/sub/r.db", tmp_path / "files2", None, None)
        await bad_db.start()
        try:
            bad_db.record("r", "echo", "1", {"x": np.zeros((1, 4), np.float32)}, None, None, 200, 1.0)
            await settle(bad_db)
            assert bad_db.stats["stored"] == 0 and bad_db.stats["errors"] >= 1
            left = [p for p in (tmp_path / "files2").rglob("*") if p.is_file()]
            assert left == []
        finally:
            await bad_db.stop()

        # Whatever record() is handed, it does not raise.
        ok = store_in(tmp_path, max_age_s=None, max_bytes=None)
        ok.record("odd", "echo", "1", {"x": "not an array"}, None, None, 200, 1.0)  # type: ignore[dict-item]
        assert ok.stats["errors"] == 1

    asyncio.run(main())


def test_storage_recovers_when_the_database_comes_back(tmp_path):
    async def main() -> None:
        where = tmp_path / "db"
        where.write_text("a file where the database's folder should be")
        x = np.zeros((1, 4), np.float32)
        store = ResultStore(f"sqlite:///{where / 'r.db'}", tmp_path / "files", None, 10**9)
        await store.start()
        try:
            store.record("lost", "echo", "1", {"x": x}, None, None, 200, 1.0)
            await settle(store)
            assert store.stats["errors"] >= 2 and store.stats["stored"] == 0  # start, then the batch
            where.unlink()
            where.mkdir()
            store.record("kept", "echo", "1", {"x": x}, None, None, 200, 1.0)
            await settle(store)
            assert store.stats["stored"] == 1
            assert [r["request_id"] for r in await store.list()] == ["kept"]
            assert len(list((tmp_path / "files").rglob("*.results"))) == 1  # the failed batch's file went
        finally:
            await store.stop()


def test_full_queue_drops_and_counts(tmp_path):
    async def main() -> None:
        store = store_in(tmp_path, max_age_s=None, max_bytes=None, queue_size=3, max_queue_bytes=10_000)
        await store.start()
        try:
            x = np.zeros((1, 4), np.float32)
            for i in range(5):  # no await between: the writer cannot run
                store.record(f"r{i}", "echo", "1", {"x": x}, None, None, 200, 1.0)
            store.record("big", "echo", "1", {"x": np.zeros((1, 10_000), np.float32)}, None, None, 200, 1.0)
            assert store.stats["dropped"] == 3
            await settle(store)
            assert store.stats["stored"] == 3
            store.record("big", "echo", "1", {"x": np.zeros((1, 10_000), np.float32)}, None, None, 200, 1.0)
            assert store.stats["dropped"] == 4
        finally:
            await store.stop()

    asyncio.run(main())


def test_stop_writes_what_is_queued(tmp_path):
    async def main() -> None:
        store = store_in(tmp_path, max_age_s=None, max_bytes=None)
        await store.start()
        for i in range(300):
            store.record(f"r{i}", "echo", "1", {"x": np.zeros((1, 4), np.float32)}, None, None, 200, 1.0)
        await store.stop()
        assert store.stats["stored"] == 300 and store.stats["dropped"] == 0
        store.record("late", "echo", "1", None, None, None, 200, 1.0)
        assert store.stats["dropped"] == 1
        again = store_in(tmp_path, max_age_s=None, max_bytes=None)
        await again.start()
        try:
            assert len(await again.list(limit=1000)) == 300
        finally:
            await again.stop()

    asyncio.run(main())


def test_bad_database_url_is_refused_at_once(tmp_path):
    with pytest.raises(ValueError, match="unsupported database"):
        ResultStore("mysql://x/y", tmp_path, None, None)


# ------------------------------------------------------------------------------------ PostgreSQL


def test_round_trip_postgresql(tmp_path, pg_url):
    asyncio.run(_round_trip(store_in(tmp_path, pg_url, max_age_s=None, max_bytes=None)))


def test_two_clusters_share_one_postgresql_database(tmp_path, pg_url):
    async def main() -> None:
        a = ResultStore(pg_url, tmp_path / "a", None, 1, cluster="site-a", janitor_s=3600)
        b = ResultStore(pg_url, tmp_path / "b", None, None, cluster="site-b")
        await asyncio.gather(a.start(), b.start())  # both create the table at once
        try:
            a.record("ra", "echo", "1", {"x": np.zeros((1, 4), np.float32)}, None, None, 200, 1.0)
            b.record("rb", "echo", "1", {"x": np.zeros((1, 4), np.float32)}, None, None, 200, 1.0)
            await settle(a)
            await settle(b)
            assert [r["request_id"] for r in await a.list()] == ["ra"]
            assert await a.get("rb") is None
            await a.enforce_retention()  # a's size limit empties a, never b
            assert await a.list() == [] and [r["request_id"] for r in await b.list()] == ["rb"]
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


# ------------------------------------------------------------------------ a real gateway, end to end


def _results(c, query: str = "") -> list[dict]:
    code, body = c.get_json("/v2/results" + query)
    assert code == 200, body
    return body


def _wait_results(c, n: int, query: str = "", timeout: float = 10.0) -> list[dict]:
    end = time.monotonic() + timeout
    while True:
        rows = _results(c, query)
        if len(rows) >= n or time.monotonic() > end:
            return rows
        time.sleep(0.05)


def _metric(c, name: str) -> float:
    code, _, text = c.request("GET", "/metrics")
    assert code == 200
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_gateway_stores_requests_and_answers_them_back(cluster, model_repo, tmp_path):
    lc = cluster(
        gateway_args=[
            "--store-results",
            f"sqlite:///{tmp_path / 'results.db'}",
            "--results-dir",
            str(tmp_path / "results"),
            "--results-max-age",
            "1h",
        ]
    )
    lc.add_worker("echo", repo=model_repo)
    lc.add_worker("imgstat", repo=model_repo)
    lc.wait_workers("echo", 1)
    lc.wait_workers("imgstat", 1)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    image = png(77)
    with lc.client() as c:
        # The client's own id is kept and echoed; without one, the response carries the stored id.
        body, hl = build_infer_request({"x": x}, request_id="mine-1")
        code, headers, data = c.request(
            "POST", "/v2/models/echo/infer", body, {"Inference-Header-Content-Length": str(hl)}
        )
        assert code == 200
        assert orjson.loads(data[: int(headers["inference-header-content-length"])])["id"] == "mine-1"
        body, _ = build_infer_request({"x": x}, binary=False, binary_output=False)
        code, _, data = c.request("POST", "/v2/models/echo/infer", body, {"Content-Type": "application/json"})
        assert code == 200
        generated = orjson.loads(data)["id"]
        assert generated and generated != "mine-1"
        assert np.array_equal(c.infer_raw("imgstat", image)["pixels"].shape, (1, 1, 28, 28))
        with pytest.raises(InferError):
            c.infer_raw("imgstat", b"not an image")  # the worker refuses it: stored with its status

        rows = _wait_results(c, 4)
        assert len(rows) == 4 and rows[0]["status"] == 400 and rows[0]["error"]
        assert [r["request_id"] for r in _results(c, "?model=echo")] == [generated, "mine-1"]
        assert len(_results(c, "?model=echo&limit=1")) == 1
        older = _results(c, f"?model=echo&before={rows[-2]['id']}")
        assert [r["request_id"] for r in older] == ["mine-1"]
        assert _results(c, "?status=400")[0]["model"] == "imgstat"
        assert _results(c, "?since=2000-01-01T00:00:00Z&until=" + str(time.time() + 60))
        assert _results(c, f"?since={time.time() + 60}") == []

        code, got = c.get_json("/v2/results/mine-1")
        assert code == 200 and got["model"] == "echo" and got["status"] == 200
        assert [i["name"] for i in got["inputs"]] == ["x"]
        assert got["outputs"][0]["data"] == x.reshape(-1).tolist()
        code, headers, raw = c.request("GET", "/v2/results/mine-1/inputs/x")
        assert code == 200 and headers["content-type"] == "application/octet-stream"
        assert np.array_equal(np.load(io.BytesIO(raw), allow_pickle=False), x)
        code, _, raw = c.request("GET", f"/v2/results/{generated}/outputs/y")
        assert code == 200 and np.array_equal(np.load(io.BytesIO(raw)), x)

        img_id = _results(c, "?model=imgstat&status=200")[0]["request_id"]
        code, headers, raw = c.request("GET", f"/v2/results/{img_id}/inputs/image")
        assert code == 200 and raw == image and headers["content-type"] == "image/png"

        assert c.get_json("/v2/results/no-such-id")[0] == 404
        assert c.request("GET", "/v2/results/mine-1/inputs/nope")[0] == 404
        assert c.request("GET", "/v2/results/mine-1/inputs/../../results.db")[0] == 404
        code, err = c.get_json("/v2/results?limit=lots")
        assert code == 400 and "limit" in err["error"]
        assert c.get_json("/v2/results?colour=red")[0] == 400
        assert c.request("DELETE", "/v2/results")[0] == 405
        assert _metric(c, "shoal_results_stored_total") == 4
        assert _metric(c, "shoal_results_errors_total") == 0
    with OipHttpClient(lc.url) as anon:
        assert anon.get_json("/v2/results")[0] == 401
        assert anon.get_json("/v2/results/mine-1")[0] == 401


def test_storage_failure_never_fails_a_request(cluster, model_repo, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the results folder should be")
    # Configured through the environment, as an operator may.
    monkeypatch.setenv("SHOAL_CLUSTER_STORE_RESULTS", f"sqlite:///{tmp_path / 'results.db'}")
    monkeypatch.setenv("SHOAL_CLUSTER_RESULTS_DIR", str(blocker))
    lc = cluster()
    lc.add_worker("echo", repo=model_repo)
    lc.wait_workers("echo", 1)
    with lc.client() as c:
        for i in range(50):
            y = c.infer("echo", {"x": np.full((1, 4), i, np.float32)})["y"]
            assert float(y[0, 0]) == i
        end = time.monotonic() + 10
        while _metric(c, "shoal_results_errors_total") < 50:
            assert time.monotonic() < end
            time.sleep(0.05)
        assert _metric(c, "shoal_results_stored_total") == 0
        assert _results(c) == []
    assert "result storage" in lc.gateway.tail(50)


def test_results_api_says_when_storage_is_off(cluster):
    lc = cluster()
    with lc.client() as c:
        code, body = c.get_json("/v2/results")
        assert code == 404 and "--store-results" in body["error"]
