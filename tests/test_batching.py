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
    parts = split_outputs({"y": x * 10}, batch)
    assert [p["y"].shape[0] for p in parts] == [2, 3]
    assert (parts[1]["y"] == 10).all()


def test_split_refuses_outputs_without_the_batch_rows():
    with pytest.raises(ValueError, match="rows"):
        split_outputs({"y": np.zeros(3)}, [item(0, 2), item(1, 2)])
