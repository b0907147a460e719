"""A site's own data: folders, .npz files and label files, read as the model's manifest says, and
clear errors for data that does not fit."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shoal.fusion.sources import SourceError, holdout, load_site, read_labels, read_source
from shoal.modelrepo.manifest import ImageSpec, Manifest, TensorSpec

MANIFEST = Manifest(
    name="digits",
    version="1",
    runtime="onnx",
    file="model.onnx",
    inputs=(TensorSpec("image", "FP32", (-1, 1, 4, 4)),),
    outputs=(TensorSpec("logits", "FP32", (-1, 3)),),
    max_batch_size=8,
    labels={"logits": ["zero", "one", "two"]},
    image=ImageSpec(input="image", mode="L", size=(4, 4), scale=1 / 255, mean=(0.5,), std=(0.25,)),
)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_of_images_decoded_as_the_manifest_says(tmp_path: Path) -> None:
    for label, value in (("zero", 0), ("two", 255)):
        (tmp_path / label).mkdir()
        (tmp_path / label / "a.png").write_bytes(_png(value))
    (tmp_path / "one").mkdir()
    np.save(tmp_path / "one" / "b.npy", np.full((1, 4, 4), 7.0, np.float32))  # already a tensor
    x, y = read_source(str(tmp_path), MANIFEST, {})
    assert y.tolist() == [1, 2, 0]  # folders in name order: one, two, zero
    np.testing.assert_allclose(x[0], 7.0)
    np.testing.assert_allclose(x[1], (1.0 - 0.5) / 0.25)  # 255 * scale, centred, scaled
    np.testing.assert_allclose(x[2], (0.0 - 0.5) / 0.25)
    assert x.shape == (3, 16)


def test_npz_with_names_or_indices(tmp_path: Path) -> None:
    path = tmp_path / "site.npz"
    np.savez(path, image=np.zeros((3, 1, 4, 4), np.float32), label=np.array(["one", "2", "zero"]))
    x, y = read_source(str(path), MANIFEST, {})
    assert y.tolist() == [1, 2, 0] and x.shape == (3, 16)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"image": np.zeros((2, 1, 4, 4)), "label": np.array(["one", "seven"])}, "'seven' is not one of"),
        ({"image": np.zeros((2, 1, 5, 5)), "label": np.array([0, 1])}, "the model takes"),
        ({"image": np.zeros((2, 1, 4, 4))}, "needs arrays"),
        ({"image": np.zeros((2, 1, 4, 4)), "label": np.array([0])}, "2 rows but 1 labels"),
    ],
)
def test_npz_that_does_not_fit_is_refused(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(SourceError, match=message):
        read_source(str(path), MANIFEST, {})


def test_labels_file_and_settings_errors(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("request_id,label\nr1,one\nr2,zero two\n")
    assert read_labels(csv) == {"r1": ["one"], "r2": ["zero", "two"]}
    csv.write_text("r1\n")
    with pytest.raises(SourceError, match="line 1"):
        read_labels(csv)
    with pytest.raises(SourceError, match="results_dir"):
        read_source("results:sqlite:///x.db", MANIFEST, {"labels": str(csv)})
    with pytest.raises(SourceError, match="not a folder"):
        read_source(str(tmp_path / "missing"), MANIFEST, {})
    with pytest.raises(SourceError, match="no 'data' setting"):
        load_site({}, MANIFEST, 0, 1, 0)


def test_holdout_is_fixed_and_never_everything(tmp_path: Path) -> None:
    assert holdout(10, 0.1, 3).tolist() == holdout(10, 0.1, 3).tolist()
    assert holdout(10, 0.1, 3).sum() == 1 and holdout(2, 0.9, 0).sum() == 1 and not holdout(1, 0.5, 0).any()
    path = tmp_path / "site.npz"
    np.savez(path, x=np.arange(20 * 16, dtype=np.float32).reshape(20, 1, 4, 4), label=np.zeros(20, int))
    d = load_site({"data": str(path), "holdout": 0.25}, MANIFEST, 0, 1, seed=1)
    assert (len(d.y_train), len(d.y_test)) == (15, 5)
