"""Coloured digits: a deterministic two-label image set built from MNIST, with numpy only.

Each image is an MNIST digit drawn in one of six colours on a varied dark background (plain, a
gradient or noise, in a random tint), 28x28 RGB. Its two labels, the digit and the colour, are
independent label categories, which is what a multi-head classifier needs.

Determinism: ``generate(split, n, seed)`` draws every random choice (which MNIST images, colours,
backgrounds, jitter) from one numpy generator seeded with ``(seed, split)``, so the same arguments
give the same bytes on every machine (``ColouredDigits.checksum``).

Held-out combinations: ``held_out_pairs(k)`` names k (digit, colour) pairs that the training split
never contains; the test split draws every colour for every digit, so the test images of those pairs
measure whether a model can name a combination it never saw together.

The MNIST training images are split in two pools: the target set draws from the first half only and
the small CNN's source task (``glyphs_in_random_hues``) from the second, so pretraining never sees a
target training image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.data.colour import BACKGROUNDS, SIZE, hue_to_rgb, render  # noqa: F401 (part of this data set)

DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
# Saturated colours far apart in hue, so the colour label is well defined under brightness jitter.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (235, 45, 40),
    "green": (45, 205, 65),
    "blue": (55, 95, 245),
    "yellow": (240, 220, 45),
    "magenta": (225, 55, 225),
    "cyan": (45, 220, 235),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
CATEGORIES: dict[str, tuple[str, ...]] = {"digit": DIGITS, "colour": COLOURS}
TARGET_POOL = (0, 30_000)  # MNIST training images the target set draws from
SOURCE_POOL = (30_000, 60_000)  # ... and those left for pretraining the small CNN
_SPLIT_CODE = {"train": 1, "test": 2, "source": 3}


@dataclass(frozen=True)
class ColouredDigits:
    images: np.ndarray  # uint8 [N, 28, 28, 3]
    digit: np.ndarray  # int64 [N]
    colour: np.ndarray  # int64 [N]
    source_index: np.ndarray  # int64 [N]: index of the glyph in its MNIST split
    held_out: tuple[tuple[int, int], ...]  # (digit, colour) pairs absent from the training split

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> dict[str, np.ndarray]:
        return {"digit": self.digit, "colour": self.colour}

    @property
    def combo(self) -> np.ndarray:
        """One index per (digit, colour) pair: digit * len(COLOURS) + colour."""
        return self.digit * len(COLOURS) + self.colour

    @property
    def unseen(self) -> np.ndarray:
        """Mask of the images whose (digit, colour) pair is held out of training."""
        return held_out_mask(self.digit, self.colour, self.held_out)

    def subset(self, mask: np.ndarray) -> ColouredDigits:
        return ColouredDigits(
            self.images[mask], self.digit[mask], self.colour[mask], self.source_index[mask], self.held_out
        )

    def checksum(self) -> str:
        h = hashlib.sha256()
        for a in (self.images, self.digit, self.colour, self.source_index):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def held_out_pairs(k: int) -> tuple[tuple[int, int], ...]:
    """k (digit, colour) pairs spread so that each digit loses at most one colour first: (d, d mod 6),
    then (d, d+1 mod 6), ... A model never sees these pairs together in training."""
    nc = len(COLOURS)
    if not 0 <= k < len(DIGITS) * nc:
        raise ValueError(f"hold out between 0 and {len(DIGITS) * nc - 1} of the {len(DIGITS) * nc} pairs")
    order = [(d, (d + shift) % nc) for shift in range(nc) for d in range(len(DIGITS))]
    return tuple(order[:k])


def held_out_mask(digit: np.ndarray, colour: np.ndarray, pairs: tuple[tuple[int, int], ...]) -> np.ndarray:
    mask = np.zeros(len(digit), bool)
    for d, c in pairs:
        mask |= (digit == d) & (colour == c)
    return mask


def _mnist(split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    from shoal.data.mnist import load_mnist

    return load_mnist(split, data_dir)


def generate(
    split: str,
    n: int,
    seed: int = 0,
    holdout: int = 10,
    data_dir: str | None = None,
    mnist: tuple[np.ndarray, np.ndarray] | None = None,
) -> ColouredDigits:
    """n coloured digits from MNIST's ``split`` ("train" draws from TARGET_POOL only, without the
    held-out pairs; "test" from the 10 000 test images, every pair). ``mnist`` passes the
    (images, labels) of that split when the caller already has them."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")
    images, labels = mnist if mnist is not None else _mnist(split, data_dir)
    lo, hi = TARGET_POOL if split == "train" else (0, len(images))
    if not 0 < n <= hi - lo:
        raise ValueError(f"the {split} split has {hi - lo} images to draw from; asked for {n}")
    rng = np.random.default_rng([seed, _SPLIT_CODE[split]])
    idx = np.sort(rng.choice(np.arange(lo, hi), n, replace=False))
    digit = labels[idx].astype(np.int64)
    pairs = held_out_pairs(holdout)
    nc = len(COLOURS)
    if split == "train":
        # Draw each colour among those still allowed for the image's digit.
        allowed = np.ones((len(DIGITS), nc), bool)
        for d, c in pairs:
            allowed[d, c] = False
        u = rng.random(n)
        counts = allowed[digit].sum(1)
        rank = np.floor(u * counts).astype(np.int64)
        cum = np.cumsum(allowed[digit], axis=1)  # the colour is the (rank+1)-th allowed one
        colour = (cum <= rank[:, None]).sum(1).astype(np.int64)
    else:
        colour = rng.integers(0, nc, n).astype(np.int64)
    fg = np.array([PALETTE[c] for c in COLOURS], np.float32)[colour]
    out = render(images[idx], fg, rng)
    return ColouredDigits(out, digit, colour, idx.astype(np.int64), pairs)


@dataclass(frozen=True)
class SourceTask:
    """The small CNN's pretraining set: greyscale glyphs drawn in continuous random hues, labelled with
    the glyph's class and one of ``hue_bins`` hue bins (not the target palette)."""

    images: np.ndarray  # uint8 [N, 28, 28, 3]
    labels: dict[str, np.ndarray]
    classes: dict[str, int]
    name: str


def glyphs_in_random_hues(
    source: str, n: int, seed: int = 0, hue_bins: int = 12, data_dir: str | None = None
) -> SourceTask:
    """``source`` "fashion-mnist" (garments: a transfer from other objects) or "mnist" (the training
    images of SOURCE_POOL, which the target set never uses)."""
    from shoal.data.mnist import load

    if source == "fashion-mnist":
        images, labels = load("fashion-mnist", "train", data_dir)
        lo, hi = 0, len(images)
    elif source == "mnist":
        images, labels = load("mnist", "train", data_dir)
        lo, hi = SOURCE_POOL
    else:
        raise ValueError(f"source must be fashion-mnist or mnist, not {source!r}")
    n = min(n, hi - lo)
    rng = np.random.default_rng([seed, _SPLIT_CODE["source"]])
    idx = np.sort(rng.choice(np.arange(lo, hi), n, replace=False))
    h = rng.random(n)
    fg = hue_to_rgb(h, rng.uniform(0.55, 1.0, n), rng.uniform(0.7, 1.0, n))
    out = render(images[idx], fg, rng)
    hue = np.minimum((h * hue_bins).astype(np.int64), hue_bins - 1)
    return SourceTask(
        out,
        {"glyph": labels[idx].astype(np.int64), "hue": hue},
        {"glyph": 10, "hue": hue_bins},
        source,
    )


def to_png(image: np.ndarray) -> bytes:
    """One uint8 [28, 28, 3] image as PNG bytes (what a device would send)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def describe(ds: ColouredDigits) -> dict[str, Any]:
    return {
        "images": len(ds),
        "unseen_pairs_images": int(ds.unseen.sum()),
        "held_out_pairs": [[DIGITS[d], COLOURS[c]] for d, c in ds.held_out],
        "sha256": ds.checksum(),
    }
