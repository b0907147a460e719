"""Requests joined into one frame and their results cut back: the pure functions, a real gateway
with workers speaking the wire by hand (old and new), and real workers through HTTP."""

from __future__ import annotations

import asyncio
import secrets
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from many_clients import infer_concurrently

from shoal.gateway.pool import RequestFailed
from shoal.gateway.server import Gateway, GatewayConfig
from shoal.protocol.frames import FrameDecoder, MsgType, encode_frame
from shoal.protocol.joined import JoinError, check_rows, join_key, join_requests, plan_joins, split_results
from shoal.protocol.link_messages import Results, TensorDesc
from shoal.protocol.tensors import pack_tensors, unpack_tensors
from shoal.security.tokens import login_proof


def desc(name: str, shape: list[int], datatype: str = "FP32") -> TensorDesc:
    size = int(np.prod(shape)) * (4 if datatype == "FP32" else 1)
    return TensorDesc(name, datatype, shape, size)


# ------------------------------------------------------------------------------ pure functions


def test_only_requests_a_batch_could_hold_together_share_a_key():
    a, rows = join_key([desc("x", [2, 3])], None)
    assert rows == 2
    assert a == join_key([desc("x", [5, 3])], None)[0]  # rows may differ
    assert a != join_key([desc("x", [2, 4])], None)[0]  # other non-batch dimensions
    assert a != join_key([desc("x", [2, 3])], ["y"])[0]  # other outputs asked for
    assert join_key([desc("x", [2], "BYTES")], None)[0] is None  # images: decoded one request at a time
    assert join_key([desc("x", [2, 3]), desc("z", [3, 1])], None)[0] is None  # inputs disagree on rows
    assert join_key([desc("x", [0, 3])], None)[0] is None  # an empty batch fails alone
    assert join_key([desc("x", [])], None)[0] is None  # a scalar has no rows
    assert join_key([], None)[0] is None


def test_join_then_split_gives_each_request_its_own_rows():
    reqs = []
    for i, n in enumerate([1, 3, 2]):
        specs, bufs = pack_tensors(
            {"x": np.full((n, 2), i, np.float32), "z": np.full((n, 1), 10 + i, np.int64)}
        )
        reqs.append((100 + i, specs, bufs, n, f"device-{i}"))
    header, bufs = join_requests(reqs, None)
    assert header.ids == [100, 101, 102] and header.rows == [1, 3, 2]
    assert header.rids == ["device-0", "device-1", "device-2"]
    assert check_rows(header.ids, header.rows, header.inputs) == 6
    joined = unpack_tensors(header.inputs, b"".join(bytes(b) for b in bufs))
    assert joined["x"][:, 0].tolist() == [0, 1, 1, 1, 2, 2]
    assert joined["z"][:, 0].tolist() == [10, 11, 11, 11, 12, 12]

    # The worker's answer for all six rows, cut back per request by the gateway.
    specs, out = pack_tensors({"y": joined["x"] * 2, "n": joined["z"]})
    parts = split_results(Results(header.ids, header.rows, specs, 1.5, 6), b"".join(bytes(b) for b in out))
    assert [r.id for r, _ in parts] == [100, 101, 102]
    for i, (r, body) in enumerate(parts):
        got = unpack_tensors(r.outputs, body)
        assert (got["y"] == 2 * i).all() and got["y"].shape == (header.rows[i], 2)
        assert (got["n"] == 10 + i).all()
        assert r.compute_ms == 1.5 and r.batch == 6


@pytest.mark.parametrize(
    "ids, rows, outputs, payload, why",
    [
        ([1, 2], [1], [desc("y", [1, 2])], 8, "ids"),
        ([1, 2], [1, 0], [desc("y", [1, 2])], 8, "at least one row"),
        ([1, 2], [1, 1], [desc("y", [3, 2])], 24, "rows"),
        ([1, 2], [1, 1], [TensorDesc("y", "FP32", [2, 2], 20)], 20, "bytes"),
        ([1, 2], [1, 1], [desc("y", [2, 2])], 12, "payload"),
        ([1, 2], [1, 1], [TensorDesc("y", "BYTES", [2], 10)], 10, "fixed-size"),
        ([], [], [desc("y", [0, 2])], 0, "ids"),
    ],
)
def test_a_joined_result_that_does_not_add_up_is_refused(ids, rows, outputs, payload, why):
    with pytest.raises(ValueError, match=why):
        split_results(Results(ids, rows, outputs), b"\0" * payload)


def test_join_errors_are_value_errors():
    assert issubclass(JoinError, ValueError)


tensor_descs = st.lists(
    st.builds(
        TensorDesc,
        st.sampled_from(["y", "z"]),
        st.sampled_from(["FP32", "INT8", "BYTES", "FP99"]),
        st.lists(st.integers(-2, 6), max_size=3),
        st.integers(-4, 64),
    ),
    max_size=3,
)
id_lists = st.lists(st.integers(0, 9), max_size=5)
row_lists = st.lists(st.integers(-1, 4), max_size=5)


@settings(max_examples=400, deadline=None)
@given(id_lists, row_lists, tensor_descs, st.binary(max_size=96))
def test_any_joined_result_from_the_network_splits_consistently_or_is_refused(ids, rows, outputs, payload):
    """What a worker sends in RESULTS is cut back per request only when every part adds up; anything
    else is a ValueError (each request then fails 502), never another exception."""
    try:
        parts = split_results(Results(ids, rows, outputs), payload)
    except ValueError:
        return
    assert [r.id for r, _ in parts] == ids
    for (r, body), n in zip(parts, rows, strict=True):
        assert sum(t.size for t in r.outputs) == len(body)
        assert all(t.shape[0] == n for t in r.outputs)
        unpack_tensors(r.outputs, body)  # each part is a valid result on its own


@settings(max_examples=400, deadline=None)
@given(id_lists, row_lists, tensor_descs, st.binary(max_size=96))
def test_any_joined_request_from_the_network_is_checked_before_use(ids, rows, inputs, payload):
    """What the worker does with a REQUESTS (check the rows, unpack the tensors) raises only
    ValueError on bad input: the worker answers each id 400 and goes on."""
    try:
        total = check_rows(ids, rows, inputs)
        arrays = unpack_tensors(inputs, payload)
    except ValueError:
        return
    assert all(a.shape[0] == total for a in arrays.values())


def test_plan_joins_keeps_order_and_every_limit():
    k, other = ("a",), ("b",)
    assert plan_joins([(k, 1, 10)] * 5, max_rows=64, max_bytes=1000) == [[0, 1, 2, 3, 4]]
    # A change of key, a request that cannot be joined, and the limits each start a new frame.
    assert plan_joins([(k, 1, 10), (other, 1, 10), (None, 1, 10), (k, 1, 10)], 64, 1000) == [[0], [1], [2], [3]]
    assert plan_joins([(k, 30, 10), (k, 30, 10), (k, 30, 10)], 64, 1000) == [[0, 1], [2]]
    assert plan_joins([(k, 1, 600), (k, 1, 600)], 64, 1000) == [[0], [1]]
    assert plan_joins([(k, 1, 1)] * 5, 64, 1000, max_count=2) == [[0, 1], [2, 3], [4]]
    assert plan_joins([(k, 100, 1), (k, 1, 1)], 64, 1000) == [[0], [1]]  # too large alone: alone
    assert plan_joins([], 64, 1000) == []


# ------------------------------------------------- a real gateway, a worker speaking the wire by hand


class HandWorker:
    """A worker written against the wire format alone, in the test's event loop: it logs in, and the
    test reads the frames the gateway sends it and answers them as it likes."""

    def __init__(self, port: int, secret: bytes, joined: bool | None) -> None:
        self.port, self.secret, self.joined = port, secret, joined
        self.dec = FrameDecoder()
        self.frames: list = []

    async def login(self) -> None:
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        challenge = await self.next_frame()
        hello = {
            "protocol": 1,
            "worker_id": "hand",
            "proof": login_proof(self.secret, challenge.header["nonce"], "hand"),
            "model": "m",
            "model_version": "1",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
            "capacity": 64,
            "max_batch_size": 32,
        }
        if self.joined is not None:
            hello["joined"] = self.joined
        self.send(MsgType.HELLO, hello)
        assert (await self.next_frame()).type is MsgType.WELCOME

    def send(self, t: MsgType, header, bufs=b"") -> None:
        self.w.write(b"".join(bytes(b) for b in encode_frame(t, header, bufs)))

    async def next_frame(self):
        while not self.frames:
            self.frames = self.dec.feed(await self.r.read(1 << 20))
        return self.frames.pop(0)

    async def requests(self, n: int) -> list:
        """Frames until they hold ``n`` requests (PINGs skipped)."""
        got, held = [], 0
        while held < n:
            f = await self.next_frame()
            if f.type is MsgType.REQUEST:
                held += 1
            elif f.type is MsgType.REQUESTS:
                held += len(f.header["ids"])
            else:
                continue
            got.append(f)
        return got


async def gateway_and_hand_worker(joined: bool | None) -> tuple[Gateway, HandWorker, object]:
    secret = secrets.token_hex(8).encode()
    gw = Gateway(GatewayConfig(http_port=0, worker_port=0, secret=secret, no_auth=True))
    await gw.start()
    hw = HandWorker(gw.worker_port, secret, joined)
    await hw.login()
    while "m" not in gw.models.models or not gw.models.find("m", None).ready:
        await asyncio.sleep(0.01)
    return gw, hw, gw.models.find("m", None)


def ask(gw: Gateway, pool, n: int) -> list:
    """``n`` requests started in one event-loop turn, each of its own value (i rows of value i)."""
    deadline = time.monotonic() + 30
    return [
        asyncio.ensure_future(gw.service.call_model(pool, {"x": np.full((1 + i % 3, 2), i, np.float32)}, deadline))
        for i in range(n)
    ]


def test_requests_that_arrive_together_go_in_one_frame_and_come_back_apart():
    async def main():
        gw, hw, pool = await gateway_and_hand_worker(joined=True)
        try:
            calls = ask(gw, pool, 8)
            frames = await hw.requests(8)
            assert [f.type for f in frames] == [MsgType.REQUESTS]  # 8 requests, 15 rows: one frame
            h = frames[0].header
            x = unpack_tensors([TensorDesc(**t) for t in h["inputs"]], frames[0].payload)["x"]
            assert h["rows"] == [1 + i % 3 for i in range(8)] and x.shape == (15, 2)
            specs, bufs = pack_tensors({"y": x * 10})
            hw.send(MsgType.RESULTS, {"ids": h["ids"], "rows": h["rows"], "outputs": specs, "batch": 15}, bufs)
            outs = await asyncio.gather(*calls)
            for i, out in enumerate(outs):
                assert out["y"].shape == (1 + i % 3, 2) and (out["y"] == 10 * i).all()

            # A joined answer that does not add up fails each of its requests, and nothing else.
            calls = ask(gw, pool, 3)
            (f,) = await hw.requests(3)
            h = f.header
            specs, bufs = pack_tensors({"y": np.zeros((1, 2), np.float32)})
            hw.send(MsgType.RESULTS, {"ids": h["ids"], "rows": h["rows"], "outputs": specs}, bufs)
            for c in calls:
                with pytest.raises(RequestFailed, match="malformed result") as e:
                    await c
                assert e.value.status == 502
            assert gw.dispatcher.in_flight == {}
        finally:
            await gw.stop()

    asyncio.run(main())


@pytest.mark.parametrize("joined", [None, False])
def test_a_worker_that_does_not_take_joined_requests_gets_one_frame_each(joined):
    async def main():
        gw, hw, pool = await gateway_and_hand_worker(joined)
        try:
            calls = ask(gw, pool, 6)
            frames = await hw.requests(6)
            assert [f.type for f in frames] == [MsgType.REQUEST] * 6
            for f in frames:
                x = unpack_tensors([TensorDesc(**t) for t in f.header["inputs"]], f.payload)["x"]
                specs, bufs = pack_tensors({"y": x})
                hw.send(MsgType.RESULT, {"id": f.header["id"], "outputs": specs}, bufs)
            for i, out in enumerate(await asyncio.gather(*calls)):
                assert (out["y"] == i).all()
        finally:
            await gw.stop()

    asyncio.run(main())


# ------------------------------------------------------------------ real workers through HTTP


def many_at_once(lc, model: str, n: int, threads: int = 16):
    """n requests from several clients at once, each x of its own value (1 to 3 rows of value i)."""
    answers, failures = infer_concurrently(
        lc, n, model, lambda i: {"x": np.full((1 + i % 3, 4), i, np.float32)}, threads
    )
    assert failures == []
    return answers


def test_under_concurrent_load_every_request_gets_its_own_rows(cluster, model_repo):
    lc = cluster()
    lc.add_worker("echo", repo=model_repo)
    lc.add_worker("tagger", repo=model_repo)  # a BYTES output: the worker cuts a joined result itself
    lc.wait_workers("echo", 1)
    lc.wait_workers("tagger", 1)
    for i, out in many_at_once(lc, "echo", 400).items():
        assert out["y"].shape == (1 + i % 3, 4) and (out["y"] == i).all()
    for i, out in many_at_once(lc, "tagger", 400).items():
        rows = 1 + i % 3
        assert out["total"].shape == (rows, 1) and (out["total"] == 4 * i).all()
        assert [t.decode() if isinstance(t, bytes) else t for t in out["tag"]] == [f"row-{4 * i}"] * rows
