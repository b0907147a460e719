"""Paper 002, chapter 8: a deep ImageNet network reused by transfer learning.

    shoal train transfer --export models/

The deep architecture is EfficientNet-Lite0 with its ImageNet weights (the package shoal already
installs for the multi-head classifiers; nothing is downloaded). It is frozen: its pooled 1280
features of each image are computed once (by ONNX Runtime from the exported backbone, cached on
disk; ``shoal.multihead.compare.features``), and only a new classification layer is trained on them,
on the same coloured Fashion-MNIST images as ``shoal train colour-cnn`` so the two can be compared:
a small network trained from scratch against a deep one trained on other images.

Served as "which class": the backbone and the new layer as one ONNX graph, input ``image`` FP32
[-1, 3, 28, 28] in [0, 1] (the backbone upsamples and normalises inside the graph), output
``logits`` FP32 [-1, 10], labels the garments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shoal.train.catalogue import Run, Trained
from shoal.train.colour_cnn import plot_predictions, publisher
from shoal.train.data import coloured_fashion
from shoal.train.loop import Tensors, begin, plot_history
from shoal.train.tabular import classification_figures


@dataclass
class Config:
    data: str = "coloured-fashion"  # the CIFAR-10 stand-in of 'shoal train colour-cnn' (the only choice)
    train_images: int = 20000  # as colour-cnn, for a like-for-like comparison
    test_images: int = 5000  # as colour-cnn
    image_size: int = 128  # EfficientNet-Lite0's input: the 28x28 images are upsampled to it
    epochs: int = 30  # passes of the new layer over the cached features
    lr: float = 0.003  # Adam's step
    batch_size: int = 128  # feature vectors per step
    seed: int = 0  # seed of the images drawn, the layer's weights and the shuffling
    data_dir: str = ""  # where the Fashion-MNIST files are (default: the usual places)
    cache_dir: str = ""  # feature cache (default: $SHOAL_CACHE_DIR/multihead, shared with shoal multihead)


class Transferred(nn.Module):
    """The frozen backbone and the trained layer, as served."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(image))


def train(cfg: Config, run: Run, log=print) -> Trained:  # noqa: ANN001
    from shoal.multihead import compare
    from shoal.multihead.models import EFFICIENTNET, freeze, make_backbone

    trainer = begin(run, "transfer", cfg, "transfer head")
    tr = coloured_fashion("train", cfg.train_images, cfg.seed, cfg.data_dir or None)
    te = coloured_fashion("test", cfg.test_images, cfg.seed, cfg.data_dir or None)
    backbone = freeze(make_backbone(EFFICIENTNET, cfg.image_size))
    # The multi-head comparison's feature cache: same backbone, same exported graph, same cache rules.
    fcfg = compare.Config(
        image_size=cfg.image_size, threads=run.threads, progress=run.progress, cache_dir=cfg.cache_dir
    )
    root = compare.cache_root(fcfg)
    root.mkdir(parents=True, exist_ok=True)
    key = compare.backbone_key(EFFICIENTNET, fcfg)
    onnx_path = root / f"backbone-{key}-v{compare.FEATURE_VERSION}.onnx"
    with trainer.timed():  # the features count as training time: the new layer learns from them
        feats = {
            split: compare.features(
                backbone,
                ds,  # type: ignore[arg-type]  (images and len() are all it reads)
                root / f"feat-{key}-fashion-{ds.sha256[:16]}-v{compare.FEATURE_VERSION}.npy",
                fcfg,
                f"EfficientNet-Lite0 features ({split})",
                onnx_path,
            )
            for split, ds in (("train", tr), ("test", te))
        }
    feature_seconds = trainer.seconds
    log(f"EfficientNet-Lite0 features of {len(tr) + len(te)} images: {feature_seconds:.0f} s (cached after)")
    head = nn.Linear(feats["train"].shape[1], len(tr.classes))
    x_test, y_test = torch.from_numpy(feats["test"]), torch.from_numpy(te.labels)
    train_set = Tensors(torch.from_numpy(feats["train"]), torch.from_numpy(tr.labels))

    def evaluate(m: nn.Module) -> dict[str, float]:
        return classification_figures(m, x_test, y_test)

    hist = trainer.fit(head, train_set, F.cross_entropy, evaluate, log)
    model = Transferred(backbone, head).eval()
    last = hist.epochs[-1]
    title = "EfficientNet-Lite0 (ImageNet, frozen) + a new layer"
    trainer.draw(
        {
            "curves.png": lambda p: plot_history(hist, p, title),
            "predictions.png": lambda p: plot_predictions(model, te, p),
        }
    )
    trainer.device = f"{trainer.ctx.device} (features: ONNX Runtime, cpu)"
    dataset = f"coloured Fashion-MNIST, {len(tr)} training / {len(te)} test images (seed {cfg.seed})"
    details = {
        "test_loss": round(last["test_loss"], 6),
        "feature_seconds": round(feature_seconds, 1),
        "image_size": cfg.image_size,
        "trained_parameters": sum(p.numel() for p in head.parameters()),
    }
    sha = {"train": tr.sha256, "test": te.sha256}
    name = "transfer-efficientnet"
    outcome = trainer.outcome(name, dataset, "test accuracy", last["test_accuracy"], details, sha)
    return Trained(outcome, publisher(model, name, te, 64))
