"""Test model: sleeps ``delay`` seconds (the first element of input ``x``), then echoes it."""

import time

import numpy as np


class Slow:
    def __init__(self, model_dir, manifest) -> None:
        pass

    def __call__(self, inputs):
        x = inputs["x"]
        time.sleep(float(np.max(x)) if x.size else 0.0)
        return {"y": x}
