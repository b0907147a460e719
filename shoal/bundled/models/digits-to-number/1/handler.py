"""Reads the digits' scores (one row per digit, left to right) as a number: the last step of the
read-digits pipeline."""

from __future__ import annotations

import numpy as np


class DigitsToNumber:
    def __init__(self, model_dir, manifest) -> None:
        pass

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logits = inputs["logits"].reshape(-1, 10)
        out = np.empty(1, dtype=object)
        out[0] = "".join(str(int(i)) for i in logits.argmax(axis=1)).encode()
        return {"number": out}
