"""Test model with a BYTES output: a text tag and the sum of each row, so a test can check that every
request gets its own rows back when requests were joined and the worker has to cut the result."""

import numpy as np


class Tagger:
    def __init__(self, model_dir, manifest) -> None:
        pass

    def __call__(self, inputs):
        x = inputs["x"]
        total = x.sum(axis=1, keepdims=True)
        tags = np.array([f"row-{int(t)}".encode() for t in total[:, 0]], dtype=object)
        return {"tag": tags, "total": total.astype(np.float32)}
