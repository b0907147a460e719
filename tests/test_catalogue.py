"""Paper 002's model catalogue: every family trains on its real data (tiny runs here, floors well
below what full runs reach), publishes an ONNX model that ONNX Runtime answers as the trained model
does, and a real gateway and worker serve catalogue models to a client. The data loaders verify
what they read, and the ABC writer of the Bach family round-trips through music21's parser."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("skl2onnx")

from shoal.data.mnist import DatasetError  # noqa: E402
from shoal.modelrepo import load_manifest  # noqa: E402
from shoal.train.catalogue import FAMILIES, Run, load_results, provenance, table  # noqa: E402

# (family, data) -> (tiny settings, metric floor or ceiling)
QUICK: dict[tuple[str, str], tuple[dict[str, object], str, float]] = {
    ("kmeans", "blobs"): ({}, ">", 0.8),
    ("kmeans", "circles"): ({}, "<", 0.2),  # the book's point: k-means cannot separate rings
    ("knn", "circles"): ({}, ">", 0.95),
    ("linear", "line"): ({"epochs": 15}, ">", 0.9),
    ("linear", "diabetes"): ({"epochs": 15}, ">", 0.3),
    ("logistic", "cancer"): ({"epochs": 8}, ">", 0.8),
    ("logistic", "digits"): ({"epochs": 4}, ">", 0.85),
    ("feedforward", "wave"): ({"epochs": 40}, "<", 0.6),
    ("feedforward", "cars"): ({"epochs": 40}, "<", 6.0),
    ("feedforward", "wine"): ({"epochs": 25}, ">", 0.85),
    ("colour-cnn", "coloured-fashion"): ({"train_images": 1500, "test_images": 200, "epochs": 1}, ">", 0.2),
    ("energy", "taylor"): ({"epochs": 1, "hidden": 8}, "<", 15.0),
    ("bach", "chorales"): ({"chorales": 20, "epochs": 3, "batch_size": 16, "hidden": 32, "samples": 1}, "<", 4.5),
    ("transfer", "coloured-fashion"): (
        {"train_images": 200, "test_images": 100, "epochs": 4, "image_size": 32},
        ">",
        0.3,
    ),
}


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Feature and ABC caches of these tiny runs stay out of the user's cache.
    mp = pytest.MonkeyPatch()
    mp.setenv("SHOAL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def _data_ready(family: str) -> str | None:
    try:
        if family in ("colour-cnn", "transfer"):
            from shoal.data.mnist import load

            load("fashion-mnist", "test")
        if family == "transfer":
            from shoal.multihead.models import efficientnet_weights_path

            efficientnet_weights_path()
        if family == "bach":
            import music21  # noqa: F401
    except Exception as e:  # noqa: BLE001 (whatever is missing, say it)
        return str(e)
    return None


@pytest.mark.parametrize(("family", "data"), list(QUICK), ids=[f"{f}-{d}" for f, d in QUICK])
def test_family_trains_and_publishes_a_model_onnx_runtime_answers_alike(
    tmp_path: Path, family: str, data: str
) -> None:
    missing = _data_ready(family)
    if missing:
        pytest.skip(missing)
    settings, op, bound = QUICK[(family, data)]
    mod = importlib.import_module(FAMILIES[family].module)
    run = Run(out_dir=str(tmp_path / "run"), threads=1, progress=False, plot=True)
    trained = mod.train(mod.Config(data=data, **settings), run, _quiet)
    o = trained.outcome
    assert (o.value > bound) if op == ">" else (o.value < bound), (o.metric, o.value)
    assert o.plots and all(Path(p).stat().st_size > 5000 for p in o.plots)
    assert o.data_sha256 and o.device.startswith("cpu")
    # publish() refuses a model whose ONNX answers differ from the trained model's
    dest = trained.publish(str(tmp_path / "repo"), None, False, provenance(o, f"shoal train {family}"))
    man = load_manifest(dest)
    assert man.name == o.model and man.runtime == "onnx" and (dest / "model.onnx").stat().st_size > 0
    assert man.provenance["onnx_parity"]["inputs"] > 0 and man.provenance["dataset"] == o.dataset


def test_a_gateway_and_worker_serve_catalogue_models(cluster, tmp_path: Path) -> None:
    from shoal.train import kmeans, knn

    repo = tmp_path / "repo"
    run = Run(out_dir=str(tmp_path / "run"), plot=False)
    fitted = {}
    for mod in (kmeans, knn):
        trained = mod.train(mod.Config(), run, _quiet)
        trained.publish(str(repo), None, False, provenance(trained.outcome, "test"))
        fitted[trained.outcome.model] = trained
    lc = cluster()
    for model in fitted:
        lc.add_worker(model, repo=str(repo))
    for model in fitted:
        lc.wait_workers(model, 1)
    points = np.array([[0.0, 0.95], [0.1, -0.35], [-2.0, -2.0], [2.0, 1.5]], np.float32)
    with lc.client() as c:
        outs = c.infer("knn-circles", {"features": points})
        code, meta = c.get_json("/v2/models/knn-circles")
        blobs = c.infer("kmeans-blobs", {"features": points})
    # the outer ring (radius 1) and the inner one (radius 0.4), as the book's k-NN says
    assert outs["label"].tolist()[:2] == [0, 1]
    assert outs["probabilities"].shape == (4, 2)
    assert code == 200 and meta["parameters"]["labels"]["probabilities"] == ["outer ring", "inner ring"]
    km = load_manifest(repo / "kmeans-blobs" / "1")
    assert km.outputs[0].name == "label" and blobs["label"].shape == (4,)
    assert blobs["label"][2] != blobs["label"][3]  # two blob centres, two clusters


# ------------------------------------------------------------------------------------------- data


def test_auto_mpg_is_read_and_verified(tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    from shoal.train.data import CARS_SHA256, cars, cars_file

    try:
        t = cars()
    except DatasetError as e:
        pytest.skip(str(e))
    assert t.x.shape == (392, 9) and t.y.min() > 5 and t.sha256 == CARS_SHA256
    bad = tmp_path / "cars.json"
    rows = json.loads(cars_file().read_text())
    rows[0]["Miles_per_Gallon"] = 99
    bad.write_text(json.dumps(rows))
    with pytest.raises(DatasetError, match="sha256"):
        cars(str(tmp_path))


def test_electricity_demand_is_read_and_verified(tmp_path: Path) -> None:
    from shoal.train.data import taylor

    try:
        v = taylor()
    except DatasetError as e:
        pytest.skip(str(e))
    assert v.shape == (4032,) and 15000 < v.min() and v.max() < 45000
    csv = "rownames,x\n" + "".join(f"{i + 1},{int(x) + (i == 100)}\n" for i, x in enumerate(v))
    (tmp_path / "taylor.csv").write_text(csv)
    with pytest.raises(DatasetError, match="sha256"):
        taylor(str(tmp_path))
    (tmp_path / "taylor.csv").write_text(csv.replace(f"101,{int(v[100]) + 1}", f"101,{int(v[100])}"))
    assert np.array_equal(taylor(str(tmp_path)), v)


def test_coloured_fashion_is_deterministic() -> None:
    from shoal.train.data import coloured_fashion

    try:
        a = coloured_fashion("test", 50, seed=3)
    except DatasetError as e:
        pytest.skip(str(e))
    b, c = coloured_fashion("test", 50, seed=3), coloured_fashion("test", 50, seed=4)
    assert a.sha256 == b.sha256 != c.sha256
    assert a.images.shape == (50, 28, 28, 3) and len(a.classes) == 10
    # colour carries no class: channels differ within images (not grey)
    assert np.abs(a.images[..., 0].astype(int) - a.images[..., 1]).mean() > 5


def test_abc_of_a_chorale_reads_back_as_the_same_melody() -> None:
    music21 = pytest.importorskip("music21")
    from shoal.train.bach import parses, to_abc

    score = music21.corpus.parse("bach/bwv269")
    abc = to_abc(score, 1, "bwv269")
    assert abc is not None and abc.startswith("X:1\nT:bwv269\nM:3/4\nL:1/8\nK:G\n")
    back = music21.converter.parse(abc, format="abc")
    want = [(n.pitch.midi, float(n.quarterLength)) for n in score.parts[0].flatten().notes]
    got = [(n.pitch.midi, float(n.quarterLength)) for n in back.flatten().notes]
    assert got == want
    assert parses(abc) == len(want) and parses("X:1\nK:G\n|]]]^^^") == 0


# ------------------------------------------------------------------------------------------- CLI


def test_train_list_names_every_family_and_what_it_reached() -> None:
    text = table()
    for fam in FAMILIES.values():
        for data in fam.data:
            assert fam.name in text and data in text
    results = load_results()
    measured = {(r["family"], r["data"]) for r in results.values()}
    missing = [(f.name, d) for f in FAMILIES.values() for d in f.data if (f.name, d) not in measured]
    assert missing == [], f"no measured result shipped for {missing}"
    assert "not measured yet" not in text


def test_family_options_come_from_its_config_with_help(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "train", "kmeans", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "--clusters" in r.stdout and "as many as the set has groups" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "train", "knn", "--data", "moons"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "invalid choice: 'moons'" in r.stderr
    from shoal.cli import main

    out = tmp_path / "run"
    assert main(["train", "knn", "--out", str(out), "--record", str(tmp_path / "results.json")]) == 0
    saved = json.loads((out / "result.json").read_text())
    assert saved["command"] == "shoal train knn"  # where its files went is not part of what it learnt
    recorded = json.loads((tmp_path / "results.json").read_text())["knn-circles"]
    assert recorded["family"] == "knn" and recorded["value"] == saved["value"]
