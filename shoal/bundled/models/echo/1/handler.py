"""A trivial model: returns its input. Used to measure what the serving path itself costs."""

from __future__ import annotations

import numpy as np


class Echo:
    def __init__(self, model_dir, manifest) -> None:
        self.manifest = manifest

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"]}
