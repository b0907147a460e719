"""Result storage: the store on SQLite (and PostgreSQL when this machine has one), retention, broken
storage that must never fail a request, and the HTTP API on a real gateway with workers."""

from __future__ import annotations

import asyncio
import io
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shoal.gateway.storage import ResultStore

PG_ADMIN = os.environ.get("SHOAL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


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
        finally:
            await store.stop()

    asyncio.run(main())


def test_retention_by_age_removes_rows_files_and_orphans(tmp_path):
    async def main() -> None:
        store = store_in(tmp_path, max_age_s=0.5, max_bytes=None, janitor_s=0.1)
        orphan = tmp_path / "files" / "2001010100" / "abc"
        orphan.mkdir(parents=True)
        (orphan / "in-x.npy").write_bytes(b"junk")
        (tmp_path / "files" / "keep-me").mkdir()  # not an hour folder: never touched
        await store.start()
        try:
            store.record("old", "echo", "1", {"x": np.zeros((1, 4), np.float32)}, None, None, 200, 1.0)
            await settle(store)
            (row,) = await store.list()
            folder = tmp_path / "files" / (await store._row("old"))["path"]
            assert folder.is_dir() and store.stats["bytes"] > 0
            await asyncio.sleep(0.4)
            store.record("new", "echo", "1", {"x": np.zeros((1, 4), np.float32)}, None, None, 200, 1.0)
            await settle(store)
            end = time.monotonic() + 5
            while await store.get("old") is not None:
                assert time.monotonic() < end
                await asyncio.sleep(0.05)
            assert not folder.exists()
            assert [r["request_id"] for r in await store.list()] == ["new"]
            assert not orphan.parent.exists() and (tmp_path / "files" / "keep-me").is_dir()
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
            for i in range(10):
                store.record(f"r{i}", "echo", "1", {"x": x}, None, None, 200, 1.0)
            await settle(store)
            assert store.stats["bytes"] > 10 * 4000
            assert await store.enforce_retention() == 7
            assert [r["request_id"] for r in await store.list()] == ["r9", "r8", "r7"]
            assert store.stats["bytes"] <= 3 * 4200
            hour_dirs = [p for p in (tmp_path / "files").iterdir()]
            assert sum(len(list(h.iterdir())) for h in hour_dirs) == 3
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


async def _pg(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def pg_url():
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        pytest.skip("asyncpg is not installed (pip install -e '.[storage]')")
    name = f"shoal_results_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_pg(f"CREATE DATABASE {name}"))
    except Exception as e:  # no server, or no right to create a database
        pytest.skip(f"no PostgreSQL server to test against at {PG_ADMIN}: {e}")
    yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    asyncio.run(_pg(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


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
