"""The model repository manifest: what is accepted, and errors that name the key."""

import json

import pytest

from shoal.modelrepo.manifest import ManifestError, list_versions, parse_manifest, resolve, write_manifest

GOOD = {
    "name": "m",
    "version": "1",
    "runtime": "onnx",
    "file": "model.onnx",
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    "max_batch_size": 8,
    "labels": {"logits": [str(i) for i in range(10)]},
    "image": {"input": "image", "mode": "L", "size": [28, 28]},
}


def test_good_manifest_round_trips(tmp_path):
    m = parse_manifest(GOOD)
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"x")
    write_manifest(tmp_path / "m" / "1", m)
    d, m2 = resolve(tmp_path, "m")
    assert m2 == m and d.name == "1"


@pytest.mark.parametrize(
    "change, key",
    [
        ({"runtime": "tensorflow"}, "runtime"),
        ({"name": "../etc"}, "name"),
        ({"file": "../../x"}, "file"),
        ({"inputs": [{"name": "image", "datatype": "FLOAT", "shape": [-1]}]}, "datatype"),
        ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 28]}]}, "batch"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"labels": {"nope": ["a"]}}, "labels"),
        ({"image": {"input": "nope"}}, "image.input"),
    ],
)
def test_errors_name_the_key(change, key):
    with pytest.raises(ManifestError, match=key.replace(".", r"\.")):
        parse_manifest({**GOOD, **change})


def test_versions_sort_numerically_and_missing_model_is_clear(tmp_path):
    for v in ["2", "10", "1"]:
        (tmp_path / "m" / v).mkdir(parents=True)
        (tmp_path / "m" / v / "manifest.json").write_text(json.dumps({**GOOD, "version": v}))
    assert list_versions(tmp_path, "m") == ["1", "2", "10"]
    with pytest.raises(ManifestError, match="no versions of model 'x'"):
        resolve(tmp_path, "x")
    with pytest.raises(ManifestError, match="model file"):
        resolve(tmp_path, "m", "10")


def test_features_say_what_each_column_of_an_input_means(tmp_path):
    from shoal.train.data import CARS_INPUTS

    doc = {**GOOD, "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 9]}], "image": None,
           "features": {"features": CARS_INPUTS}}
    m = parse_manifest(doc)
    assert len(m.features["features"]) == 9 and "four digits" in m.features["features"][5]
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"x")
    write_manifest(tmp_path / "m" / "1", m)
    assert resolve(tmp_path, "m")[1] == m
    with pytest.raises(ManifestError, match=r"features: 'nope' is not an input"):
        parse_manifest({**doc, "features": {"nope": ["a"]}})
    with pytest.raises(ManifestError, match=r"features.features: 2 features for an input whose last dimension is 9"):
        parse_manifest({**doc, "features": {"features": ["a", "b"]}})
