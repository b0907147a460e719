"""Finds handwritten digits written side by side on a dark background and cuts each one out the way
MNIST was made: the digit's box scaled so its longer side is 20 pixels, placed in a 28 x 28 frame with
its centre of mass in the middle. Outputs the crops (normalised like the MNIST CNN's input) and their
boxes, left to right. The first step of the read-digits pipeline."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

INK = 40  # grey level above which a pixel is ink
MIN_GAP = 2  # empty columns that separate two digits
MIN_INK = 15  # pixels; smaller blobs are noise
MEAN, STD = 0.1307, 0.3081


def segments(ink_cols: np.ndarray) -> list[tuple[int, int]]:
    """Runs of columns with ink, merged across gaps narrower than MIN_GAP."""
    runs: list[list[int]] = []
    for x in np.flatnonzero(ink_cols):
        if runs and x - runs[-1][1] <= MIN_GAP:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return [(a, b + 1) for a, b in runs]


def mnist_crop(patch: np.ndarray) -> np.ndarray:
    h, w = patch.shape
    s = 20.0 / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = np.asarray(
        Image.fromarray(patch.astype(np.uint8)).resize((nw, nh), Image.BILINEAR), dtype=np.float32
    )
    out = np.zeros((28, 28), np.float32)
    total = small.sum()
    if total > 0:
        ys, xs = np.indices(small.shape)
        cy, cx = (ys * small).sum() / total, (xs * small).sum() / total
    else:
        cy, cx = nh / 2, nw / 2
    oy = int(round(14 - cy))
    ox = int(round(14 - cx))
    oy = min(max(oy, 0), 28 - nh)
    ox = min(max(ox, 0), 28 - nw)
    out[oy : oy + nh, ox : ox + nw] = small
    return out


class DigitDetector:
    def __init__(self, model_dir, manifest) -> None:
        pass

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = bytes(inputs["image"].reshape(-1)[0])
        with Image.open(io.BytesIO(data)) as im:
            img = np.asarray(im.convert("L"), dtype=np.float32)
        ink = img > INK
        crops, boxes = [], []
        for x0, x1 in segments(ink.any(axis=0)):
            rows = np.flatnonzero(ink[:, x0:x1].any(axis=1))
            y0, y1 = int(rows[0]), int(rows[-1]) + 1
            if ink[y0:y1, x0:x1].sum() < MIN_INK:
                continue
            crops.append(mnist_crop(img[y0:y1, x0:x1]))
            boxes.append([x0, y0, x1, y1])
        c = (np.asarray(crops, np.float32).reshape(-1, 1, 28, 28) / 255.0 - MEAN) / STD
        return {"crops": c.astype(np.float32), "boxes": np.asarray(boxes, np.int32).reshape(-1, 4)}
