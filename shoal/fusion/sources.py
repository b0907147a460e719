"""A site's own training data, in the form its deployed model receives it, with labels.

A site points at its data; no code changes. Every source yields rows of the model's input tensor as
the model repository's manifest describes it (``inputs[0]``: its shape without the batch dimension;
``image``: how an encoded image becomes that tensor, decoded exactly as a worker decodes it), and a
label per row, a class name from the manifest's ``labels`` or its index.

- **a folder** ``<dir>/<label>/<file>``: PNG/JPEG images (decoded by the manifest's ``image`` block)
  or ``.npy`` arrays of the input's shape, one example per file;
- **a file** ``.npz``: an array named after the model's input (or ``x``) of shape ``[N, ...]`` and an
  array ``label`` of ``N`` class names or indices;
- **a gateway's stored results** ``results:<database URL>`` with ``results_dir`` (the gateway's
  ``--results-dir``) and ``labels``, a CSV of ``request_id,label`` lines: the inputs the site's own
  gateway served (docs/result-storage.md), labelled afterwards. A request that carried ``n`` rows
  takes ``n`` labels separated by spaces; requests without a label are left out;
- ``paper:<data set>``: paper 003's bundled data sets (``datasets.py``), this peer's shard of them.

Everything is read on the site; only weights ever leave it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from shoal.fusion.datasets import Dataset
from shoal.modelrepo.manifest import ImageSpec, Manifest
from shoal.modelrepo.versions import is_number

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class SourceError(ValueError):
    """A data source that cannot be read; the message says which file or row and why."""


def class_index(label: Any, classes: list[str], where: str) -> int:
    """A label as the class index: a class name, or an index given as a number."""
    text = str(label).strip()
    if text in classes:
        return classes.index(text)
    if is_number(text) and int(text) < len(classes):
        return int(text)
    raise SourceError(f"{where}: label {text!r} is not one of the model's classes {classes}")


def _input_shape(manifest: Manifest) -> tuple[int, ...]:
    shape = manifest.inputs[0].shape
    return tuple(shape[1:]) if manifest.max_batch_size > 0 else tuple(shape)


def _decode_image(data: bytes, spec: ImageSpec | None, where: str) -> np.ndarray:
    if spec is None:
        raise SourceError(f"{where}: an image, but the model's manifest has no 'image' block to decode it")
    from shoal.runtime.images import ImageError, decode_image

    try:
        return decode_image(data, spec)
    except ImageError as e:
        raise SourceError(f"{where}: {e}") from None


def _check_rows(x: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    want = tuple(shape)
    if x.ndim != len(want) + 1 or any(w not in (-1, g) for w, g in zip(want, x.shape[1:], strict=True)):
        raise SourceError(f"{where}: rows of shape {list(x.shape[1:])}, the model takes {list(want)}")
    return x.reshape(len(x), -1).astype(np.float32)


def read_folder(folder: Path, manifest: Manifest, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``<folder>/<label>/<file>``: images or ``.npy`` examples, one per file."""
    shape = _input_shape(manifest)
    xs, ys = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = class_index(sub.name, classes, str(sub))
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                xs.append(_decode_image(f.read_bytes(), manifest.image, str(f)))
            elif f.suffix == ".npy":
                xs.append(np.load(f, allow_pickle=False))
            else:
                continue
            ys.append(label)
    if not xs:
        raise SourceError(f"{folder}: no examples (expected <label>/<image or .npy> files)")
    return _check_rows(np.stack(xs), shape, str(folder)), np.array(ys, np.int64)


def read_npz(path: Path, manifest: Manifest, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """An ``.npz`` with the model's input (or ``x``) ``[N, ...]`` and ``label`` ``[N]``."""
    name = manifest.inputs[0].name
    with np.load(path, allow_pickle=False) as z:
        key = name if name in z.files else "x"
        if key not in z.files or "label" not in z.files:
            raise SourceError(f"{path}: needs arrays '{name}' (or 'x') and 'label'; it has {z.files}")
        x, labels = z[key], z["label"]
    if len(x) != len(labels):
        raise SourceError(f"{path}: {len(x)} rows but {len(labels)} labels")
    y = np.array([class_index(v, classes, f"{path} row {i}") for i, v in enumerate(labels)], np.int64)
    return _check_rows(x, _input_shape(manifest), str(path)), y


def read_labels(path: Path) -> dict[str, list[str]]:
    """``request_id,label`` lines (a header line is allowed); several rows' labels separated by spaces."""
    out: dict[str, list[str]] = {}
    with path.open(newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or (i == 0 and row[0].strip().lower() == "request_id"):
                continue
            if len(row) != 2:
                raise SourceError(f"{path} line {i + 1}: expected 'request_id,label'")
            out[row[0].strip()] = row[1].split()
    return out


def read_stored_results(
    db_url: str,
    results_dir: Path,
    labels: dict[str, list[str]],
    manifest: Manifest,
    classes: list[str],
    model: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The inputs a gateway stored (``shoal cluster --store-results``) that have a label.

    Reads the ``shoal_results`` table and the batch files as docs/result-storage.md lays them out:
    answered requests (status 200), newest request per id, the tensor named like the model's input.
    """
    from sqlalchemy import create_engine, text

    name = manifest.inputs[0].name
    shape = _input_shape(manifest)
    query = "SELECT request_id, path, inputs FROM shoal_results WHERE status = 200"
    params: dict[str, Any] = {}
    if model:
        query += " AND model = :model"
        params["model"] = model
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(query + " ORDER BY id"), params).fetchall()
    except Exception as e:
        raise SourceError(f"{db_url}: cannot read the stored results ({type(e).__name__}: {e})") from None
    finally:
        engine.dispose()
    latest = {r[0]: r for r in rows}  # ids may repeat: the newest request wins, as the gateway's API does
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for rid, row in latest.items():
        if rid not in labels:
            continue
        _, rel, inputs = row
        tensor = next((t for t in json.loads(inputs) if t["name"] == name), None)
        where = f"stored request {rid!r}"
        if tensor is None:
            raise SourceError(f"{where}: no input named {name!r}")
        with (results_dir / rel).open("rb") as f:
            blobs = []
            for off, size in tensor["at"]:
                f.seek(off)
                blobs.append(f.read(size))
        if tensor["datatype"] == "BYTES":
            got = np.stack([_decode_image(b, manifest.image, where) for b in blobs])
        else:
            got = np.load(io.BytesIO(blobs[0]), allow_pickle=False)
            got = got[None] if got.ndim == len(shape) else got  # a request without a batch dimension
        if len(labels[rid]) != len(got):
            raise SourceError(f"{where}: {len(got)} rows but {len(labels[rid])} labels")
        xs.append(_check_rows(got, shape, where))
        ys += [class_index(v, classes, where) for v in labels[rid]]
    if not xs:
        raise SourceError(f"{db_url}: no stored request has a label in the labels file")
    return np.concatenate(xs), np.array(ys, np.int64)


def holdout(n: int, fraction: float, seed: int) -> np.ndarray:
    """A fixed boolean mask of held-out rows (at least one, never all) for the site's own metric."""
    if n < 2 or fraction <= 0:
        return np.zeros(n, bool)
    k = min(n - 1, max(1, int(round(fraction * n))))
    mask = np.zeros(n, bool)
    mask[np.random.default_rng([seed, 0x7E57]).choice(n, k, replace=False)] = True
    return mask


def read_source(spec: str, manifest: Manifest, options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Rows and labels of one source spec (see the module docstring); ``options``: the site's settings."""
    classes = list(manifest.labels.get(manifest.outputs[0].name, []))
    if not classes:
        raise SourceError(
            f"the model {manifest.name!r} lists no class labels for {manifest.outputs[0].name!r}"
        )
    if spec.startswith("results:"):
        for key in ("results_dir", "labels"):
            if not options.get(key):
                raise SourceError(f"a results: source needs the site setting {key!r}")
        return read_stored_results(
            spec.removeprefix("results:"),
            Path(options["results_dir"]),
            read_labels(Path(options["labels"])),
            manifest,
            classes,
            options.get("model") or None,
        )
    path = Path(spec)
    if path.is_dir():
        return read_folder(path, manifest, classes)
    if path.is_file() and path.suffix == ".npz":
        return read_npz(path, manifest, classes)
    raise SourceError(f"{spec}: not a folder, an .npz file, results:<database URL> or paper:<data set>")


def load_site(
    options: dict[str, Any], manifest: Manifest, peer: int, peers: int, seed: int, split: str = "random"
) -> Dataset:
    """A site's training rows and held-out rows, from its settings (``data``, ``test_data``, ``holdout``).

    ``paper:<name>`` takes this peer's shard of a bundled data set and its standard test set; other
    sources hold out ``holdout`` (default 0.1) of the rows unless ``test_data`` names a source.
    """
    spec = str(options.get("data", ""))
    if not spec:
        raise SourceError("the site has no 'data' setting (a folder, an .npz, results:<URL> or paper:<name>)")
    if spec.startswith("paper:"):
        from shoal.fusion import datasets

        d = datasets.load(spec.removeprefix("paper:"))
        rows = datasets.shard(d.y_train, split, peers, seed=seed)[peer]
        return Dataset(d.name, d.x_train[rows], d.y_train[rows], d.x_test, d.y_test, d.n_classes)
    x, y = read_source(spec, manifest, options)
    n_classes = len(manifest.labels[manifest.outputs[0].name])
    if options.get("test_data"):
        xt, yt = read_source(str(options["test_data"]), manifest, options)
        return Dataset(spec, x, y, xt, yt, n_classes)
    test = holdout(len(x), float(options.get("holdout", 0.1)), seed)
    return Dataset(spec, x[~test], y[~test], x[test], y[test], n_classes)
