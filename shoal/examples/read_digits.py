"""The read-digits pipeline of paper 000's context list (a detector, then a classifier per object):
images of several handwritten MNIST test digits side by side go through ``digit-detector``, the MNIST
CNN for each digit (fanned out across workers) and ``digits-to-number``; the answer is the number read
left to right, with the boxes.

``make_number_image`` draws such images deterministically from a seed; ``PIPELINE`` is the gateway
configuration block that declares the pipeline.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

PIPELINE = {
    "read-digits": {
        "version": "1",
        "steps": [
            {"name": "detect", "model": "digit-detector", "inputs": {"image": "request.image"}},
            {
                "name": "classify",
                "model": "mnist-cnn",
                "inputs": {"image": "detect.crops"},
                "fanout": "image",
            },
            {"name": "join", "model": "digits-to-number", "inputs": {"logits": "classify.logits"}},
        ],
        "outputs": {"number": "join.number", "boxes": "detect.boxes", "logits": "classify.logits"},
    }
}
MODELS = ("digit-detector", "mnist-cnn", "digits-to-number")


def make_number_image(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, min_digits: int = 2, max_digits: int = 5
) -> tuple[bytes, str, list[list[int]]]:
    """A PNG of k random test digits left to right with random gaps and heights; its number and the
    28 x 28 frames the digits were drawn in."""
    k = int(rng.integers(min_digits, max_digits + 1))
    idx = rng.integers(0, len(images), k)
    gaps = rng.integers(0, 8, k + 1)
    ys = rng.integers(0, 13, k)
    width = int(28 * k + gaps.sum())
    canvas = np.zeros((40, width), np.uint8)
    x = int(gaps[0])
    frames = []
    for j, i in enumerate(idx):
        y = int(ys[j])
        canvas[y : y + 28, x : x + 28] = np.maximum(canvas[y : y + 28, x : x + 28], images[i])
        frames.append([x, y, x + 28, y + 28])
        x += 28 + int(gaps[j + 1])
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue(), "".join(str(int(labels[i])) for i in idx), frames
