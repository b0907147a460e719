"""A test model that returns its input, except that a first element of 13 raises SystemExit: what a
bug in a model or framework that escapes ``except Exception`` looks like to the inference thread."""

from __future__ import annotations

import numpy as np


class Fragile:
    def __init__(self, model_dir, manifest) -> None:
        self.manifest = manifest

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if x.size and x.reshape(-1)[0] == 13:
            raise SystemExit("the model pulled the thread down")
        return {"y": x}
