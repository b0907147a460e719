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

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shoal.modelrepo import ImageSpec, TensorSpec
from shoal.train.catalogue import Outcome, Run, Trained
from shoal.train.colour_cnn import plot_predictions, to_input
from shoal.train.data import coloured_fashion
from shoal.train.loop import Tensors, fit, plot_history, settings
from shoal.train.publish import torch_publisher
from shoal.train.tabular import classification_figures, start


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

    ctx = start(run, cfg.seed)
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
    t0 = time.perf_counter()
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
    feature_seconds = time.perf_counter() - t0
    log(f"EfficientNet-Lite0 features of {len(tr) + len(te)} images: {feature_seconds:.0f} s (cached after)")
    head = nn.Linear(feats["train"].shape[1], len(tr.classes))
    x_test, y_test = torch.from_numpy(feats["test"]), torch.from_numpy(te.labels)
    out, fit_cfg = settings(run, "transfer head", cfg)
    t0 = time.perf_counter()
    train_set = Tensors(torch.from_numpy(feats["train"]), torch.from_numpy(tr.labels))
    hist = fit(head, train_set, F.cross_entropy, lambda m: classification_figures(m, x_test, y_test), fit_cfg, ctx, log)
    seconds = time.perf_counter() - t0
    model = Transferred(backbone, head.cpu()).eval()
    last = hist.epochs[-1]
    plots = []
    if run.plot and ctx.main:
        plots.append(str(plot_history(hist, out / "curves.png", "EfficientNet-Lite0 (ImageNet, frozen) + a new layer")))
        plots.append(str(plot_predictions(model, te, out / "predictions.png")))
    outcome = Outcome(
        family="transfer",
        data=cfg.data,
        model="transfer-efficientnet",
        dataset=f"coloured Fashion-MNIST, {len(tr)} training / {len(te)} test images (seed {cfg.seed})",
        metric="test accuracy",
        value=last["test_accuracy"],
        details={
            "test_loss": round(last["test_loss"], 6),
            "feature_seconds": round(feature_seconds, 1),
            "image_size": cfg.image_size,
            "trained_parameters": sum(p.numel() for p in head.parameters()),
        },
        data_sha256={"train": tr.sha256, "test": te.sha256},
        seconds=seconds + feature_seconds,
        device=f"{ctx.device} (features: ONNX Runtime, cpu)",
        plots=plots,
    )
    feeds = {"image": to_input(te.images[:64]).numpy().astype(np.float32)}
    image = ImageSpec("image", mode="RGB", size=(28, 28), scale=1 / 255, mean=(0.0,) * 3, std=(1.0,) * 3)
    outputs = [TensorSpec("logits", "FP32", (-1, len(tr.classes)))]
    pub = torch_publisher(
        model, "transfer-efficientnet", feeds, outputs, {"logits": list(tr.classes)}, classify=True, image=image
    )
    return Trained(outcome, pub)
