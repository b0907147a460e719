"""Greyscale glyphs drawn in colour over random dark backgrounds: the coloured digits of the multi-head
classifiers (paper 001) and the coloured Fashion-MNIST of the colour CNN (paper 002). numpy only."""

from __future__ import annotations

import numpy as np

BACKGROUNDS = ("plain", "gradient", "noise")
SIZE = 28


def _backgrounds(rng: np.random.Generator, n: int) -> np.ndarray:
    """n dark backgrounds float32 [n, 28, 28, 3]: plain, a two-tone gradient, or a tone with noise."""
    kind = rng.integers(0, len(BACKGROUNDS), n)
    tone_a = rng.uniform(0, 90, (n, 1, 1, 3)).astype(np.float32)
    tone_b = rng.uniform(0, 90, (n, 1, 1, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    noise = rng.normal(0, 22, (n, SIZE, SIZE, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1) - 0.5
    ramp = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy + 0.5  # [n, H, W] in ~[0, 1]
    ramp = np.clip(ramp, 0, 1)[..., None]
    bg = np.broadcast_to(tone_a, (n, SIZE, SIZE, 3)).copy()
    grad = kind == 1
    bg[grad] = tone_a[grad] * (1 - ramp[grad]) + tone_b[grad] * ramp[grad]
    noisy = kind == 2
    bg[noisy] += noise[noisy]
    return bg


def render(glyphs: np.ndarray, fg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw greyscale glyphs uint8 [n, 28, 28] in colours fg float [n, 3] (0-255) over random
    backgrounds; the glyph's grey level is its opacity."""
    n = len(glyphs)
    alpha = glyphs.astype(np.float32)[..., None] / 255.0
    # Brightness and per-channel jitter keep the colour head from matching one exact RGB value.
    gain = rng.uniform(0.75, 1.0, (n, 1, 1, 1)).astype(np.float32)
    jitter = rng.uniform(-18, 18, (n, 1, 1, 3)).astype(np.float32)
    colour = np.clip(fg.astype(np.float32)[:, None, None, :] * gain + jitter, 0, 255)
    out = _backgrounds(rng, n) * (1 - alpha) + colour * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def hue_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV (each in [0, 1]) to RGB float [n, 3] in 0-255."""
    i = np.floor(h * 6).astype(np.int64) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack(
        [
            np.stack([v, t, p], 1),
            np.stack([q, v, p], 1),
            np.stack([p, v, t], 1),
            np.stack([p, q, v], 1),
            np.stack([t, p, v], 1),
            np.stack([v, p, q], 1),
        ]
    )
    return table[i, np.arange(len(h))] * 255.0
