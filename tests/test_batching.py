"""Dynamic batching: which requests share a batch, and how results are split back."""

from collections import deque

import numpy as np
import pytest

from shoal.worker.batching import Item, concat_inputs, signature, split_outputs, take_batch


def item(i, rows, width=4, dtype=np.float32):
    x = np.full((rows, width), i, dtype=dtype)
    it = Item(i, {"x": x}, None, None, rows=rows)
    it.signature = signature(it.inputs)
    return it


def test_takes_alike_requests_in_order_up_to_max_rows():
    q = deque([item(0, 2), item(1, 3), item(2, 4), item(3, 1)])
    b = take_batch(q, 8)
    assert [i.id for i in b] == [0, 1]  # 2+3+4 > 8: stop, keep order
    assert [i.id for i in q] == [2, 3]


def test_unlike_requests_are_not_mixed():
    q = deque([item(0, 1), item(1, 1, width=5), item(2, 1)])
    assert [i.id for i in take_batch(q, 8)] == [0]
    q = deque([item(0, 1), item(1, 1, dtype=np.float64)])
    assert [i.id for i in take_batch(q, 8)] == [0]


def test_no_batching_takes_one():
    q = deque([item(0, 1), item(1, 1)])
    assert len(take_batch(q, 0)) == 1


def test_concat_and_split_round_trip():
    batch = [item(0, 2), item(1, 3)]
    x = concat_inputs(batch)["x"]
    assert x.shape == (5, 4)
    parts = split_outputs({"y": x * 10}, [it.rows for it in batch])
    assert [p["y"].shape[0] for p in parts] == [2, 3]
    assert (parts[1]["y"] == 10).all()


def test_split_refuses_outputs_without_the_batch_rows():
    with pytest.raises(ValueError, match="rows"):
        split_outputs({"y": np.zeros(3)}, [2, 2])


# ------------------------------------------------------------------- when to run a batch


def _rate_of(arrivals: list[tuple[float, int]], now: float) -> float:
    from shoal.worker.batch_policy import ArrivalRate

    r = ArrivalRate()
    for t, rows in arrivals:
        r.observe(t, rows)
    return r.rate(now)


def test_one_client_at_a_time_never_waits_for_a_window():
    from shoal.worker.batch_policy import wait_s

    # One closed-loop client: a request every 0.5 ms (its round trip), one row each.
    rate = _rate_of([(i * 0.0005, 1) for i in range(200)], 0.1)
    assert rate == pytest.approx(2000, rel=0.01)
    assert wait_s(1, 32, 0.003, rate) == 0.0  # 31 more rows would take 15.5 ms: run now


def test_a_burst_waits_just_until_the_batch_is_predicted_full():
    from shoal.worker.batch_policy import wait_s

    rate = _rate_of([(i * 0.00005, 1) for i in range(100)], 0.005)  # 20 000 rows/s
    assert wait_s(1, 32, 0.003, rate) == pytest.approx(31 / 20000, rel=0.02)
    assert wait_s(32, 32, 0.003, rate) == 0.0  # full: at once
    assert wait_s(1, 0, 0.003, rate) == 0.0  # a model that does not batch
    assert wait_s(1, 32, 0.0, rate) == 0.0  # no window


def test_sparse_and_stale_arrivals_say_nothing():
    assert _rate_of([(0.0, 1)], 0.1) == 0.0
    assert _rate_of([(0.0, 1), (0.01, 1)], 5.0) == 0.0  # older than the horizon


def test_an_idle_model_runs_a_lone_request_without_waiting_out_its_window():
    import threading
    import time

    from shoal.modelrepo.manifest import Manifest, TensorSpec
    from shoal.worker.batching import InferenceEngine

    class Identity:
        def infer(self, inputs):
            return {"y": inputs["x"]}

    spec = TensorSpec("x", "FP32", (-1, 1))
    m = Manifest("m", "1", "python", "h.py", (spec,), (TensorSpec("y", "FP32", (-1, 1)),),
                 max_batch_size=32, batch_delay_ms=60_000.0)  # a one-minute window
    got = threading.Event()
    done: list = []
    engine = InferenceEngine(Identity(), m, lambda fn, arg: fn(arg), lambda d: (done.extend(d), got.set()))
    engine.start()
    try:
        engine.submit(Item(1, {"x": np.ones((1, 1), np.float32)}, None, None, t_received=time.monotonic()))
        assert got.wait(10.0), "the request waited for its batch window"
        assert done[0].error is None and done[0].batch_rows == 1
    finally:
        engine.stop()


# --------------------------------------------------- a lone request on an idle, quick model


def _engine(runtime, done, got, image=None):
    from shoal.modelrepo.manifest import Manifest, TensorSpec
    from shoal.worker.batching import InferenceEngine

    spec = TensorSpec("x", "FP32", (-1, 1))
    m = Manifest("m", "1", "python", "h.py", (spec,), (TensorSpec("y", "FP32", (-1, 1)),),
                 max_batch_size=32, batch_delay_ms=3.0, image=image)
    return InferenceEngine(runtime, m, lambda fn, arg: fn(arg), lambda d: (done.extend(d), got.set()))


def _item(i):
    import time

    return Item(i, {"x": np.full((1, 1), i, np.float32)}, None, None, t_received=time.monotonic())


def test_a_lone_request_on_an_idle_quick_model_runs_on_the_callers_thread():
    import threading

    class Identity:
        def __init__(self):
            self.threads = []

        def infer(self, inputs):
            self.threads.append(threading.current_thread())
            if (inputs["x"] < 0).any():
                raise ValueError("negative")
            return {"y": inputs["x"]}

    rt = Identity()
    done: list = []
    got = threading.Event()
    engine = _engine(rt, done, got)
    engine.start()
    try:
        assert not engine.run_now(_item(1))  # the model's speed is not known yet: the thread runs it
        engine.submit(_item(1))
        assert got.wait(10.0)
        assert rt.threads[-1] is not threading.current_thread()
        done.clear()
        assert engine.run_now(_item(2))  # idle and quick: answered before run_now returns
        assert [d.item.id for d in done] == [2] and done[0].outputs["y"][0, 0] == 2
        assert rt.threads[-1] is threading.current_thread()
        done.clear()
        assert engine.run_now(_item(-3))  # a model error is that request's answer, here too
        assert done[0].status == 500 and "negative" in done[0].error
        assert engine.queued == 0
        got.clear()
        done.clear()
        engine.submit(_item(4))  # and the inference thread still serves
        assert got.wait(10.0) and done[0].error is None
    finally:
        engine.stop()


def test_never_while_the_inference_thread_holds_a_request_nor_for_images():
    import threading

    from shoal.modelrepo.manifest import ImageSpec

    release = threading.Event()
    running = threading.Event()

    class Gate:
        def infer(self, inputs):
            running.set()
            release.wait(10.0)
            return {"y": inputs["x"]}

    done: list = []
    got = threading.Event()
    engine = _engine(Gate(), done, got)
    engine.batch_s = 0.0001  # known to be quick
    engine.start()
    try:
        engine.submit(_item(1))
        assert running.wait(10.0)
        assert not engine.run_now(_item(2))  # the model is in use by the inference thread
        release.set()
        assert got.wait(10.0)
    finally:
        engine.stop()
    image = ImageSpec(input="x", mode="L", size=(1, 1))
    engine = _engine(Gate(), [], threading.Event(), image=image)
    engine.batch_s = 0.0001
    assert not engine.run_now(_item(3))  # decoding an image may take longer than a loop may wait
