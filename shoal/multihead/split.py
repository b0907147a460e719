"""A multi-head model cut in two for ``split`` placement: the frozen backbone runs on the device, the
heads in a cluster. The device sends the pooled features (1280 floats for EfficientNet-Lite0, 576 for
the small CNN) instead of the image, which for a camera frame is far smaller.

``export_split`` writes two model versions into a repository (``shoal.train.publish``), checked
against the whole PyTorch model on real test images before either is moved into place:

* ``coloured-digits-<backbone>-backbone/<v>/``: input ``image`` FP32 [-1, 3, 28, 28] with the whole
  model's ``image`` block (so a device turns frames into it as a worker would), output ``features``;
* ``coloured-digits-<backbone>-heads/<v>/``: input ``features`` FP32 [-1, F], outputs ``digit`` and
  ``colour`` with their labels: served by an ordinary worker.

``train_split`` trains the multi-head model's heads on the cached frozen features (the same code as
``shoal multihead``) and exports the pair; the bench of placements (``shoal bench edge``) uses it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shoal.modelrepo import Manifest, TensorSpec
from shoal.multihead import data, measure
from shoal.multihead.export import build_manifest, check_heads, model_name
from shoal.multihead.models import Classifier
from shoal.train.publish import MODEL_FILE, OPSET, publish_together


class Heads(nn.Module):
    """The heads alone: features in, one logits tensor per head out."""

    def __init__(self, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(h(f) for h in self.heads.values())


def split_names(backbone: str) -> tuple[str, str]:
    """(device model, cluster model) names."""
    return f"{model_name(backbone)}-backbone", f"{model_name(backbone)}-heads"


def _check(model: Classifier, backbone_onnx: Path, heads_onnx: Path, x: torch.Tensor, atol: float = 1e-3) -> float:
    model.eval()
    with torch.no_grad():
        ref = [t.numpy() for t in model(x)]
    feats = measure.ort_session(backbone_onnx, 2).run(None, {"image": x.numpy()})[0]
    got = measure.ort_session(heads_onnx, 2).run(None, {"features": feats})
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ref, got, strict=True))
    same = all((a.argmax(1) == b.argmax(1)).all() for a, b in zip(ref, got, strict=True))
    if diff > atol or not same:
        raise RuntimeError(f"backbone + heads in ONNX Runtime disagree with the whole model: max |diff| {diff:.2e}")
    return diff


def export_split(
    model: Classifier,
    repo: str | Path,
    backbone: str,
    provenance: dict[str, Any],
    parity_images: torch.Tensor,
    version: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write the device's backbone and the cluster's heads (the same next free version for both)."""
    check_heads(model)
    names = split_names(backbone)

    def build(folders: list[Path], v: str) -> list[Manifest]:
        feats = int(model.backbone(parity_images[:1]).shape[1])
        device, cluster = folders[0] / MODEL_FILE, folders[1] / MODEL_FILE
        b_onnx = measure.export_onnx(model.backbone, device, ["features"], (3, data.SIZE, data.SIZE))
        h_onnx = measure.export_onnx(Heads(model.heads), cluster, model.outputs, (feats,), "features")
        diff = _check(model, b_onnx, h_onnx, parity_images)
        whole = build_manifest(model_name(backbone), v, {})
        prov = {
            **provenance,
            "split": {"device": names[0], "cluster": names[1], "version": v, "features": feats},
            "onnx_parity": {"images": len(parity_images), "max_abs_diff": float(f"{diff:.3g}")},
            "onnx_opset": OPSET,
        }
        feature_spec = TensorSpec("features", "FP32", (-1, feats))
        return [
            dataclasses.replace(whole, name=names[0], outputs=(feature_spec,), labels={}, provenance=prov),
            dataclasses.replace(whole, name=names[1], inputs=(feature_spec,), image=None, provenance=prov),
        ]

    device, cluster = publish_together(repo, list(names), version, overwrite, build)
    return device, cluster


def train_split(
    repo: str | Path,
    backbone: str,
    cfg: Any = None,
    version: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the multi-head model's heads on the frozen backbone's (cached) features, as
    ``shoal multihead`` does, and export it split. Returns the pair's folders and test accuracy."""
    from shoal.multihead import compare

    cfg = cfg or compare.Config(backbones=(backbone,))
    t0 = time.perf_counter()
    train = data.generate("train", cfg.train_images, cfg.seed, cfg.holdout, cfg.data_dir)
    test = data.generate("test", cfg.test_images, cfg.seed, cfg.holdout, cfg.data_dir)
    net, _ = compare.load_backbone(backbone, cfg)
    key = compare.backbone_key(backbone, cfg)
    root = compare.cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    onnx_path = root / f"backbone-{key}-v{compare.FEATURE_VERSION}.onnx"
    f_train, f_test = (
        compare.features(
            net,
            ds,
            root / f"feat-{key}-{ds.checksum()[:16]}-v{compare.FEATURE_VERSION}.npy",
            cfg,
            f"{backbone} features ({split})",
            onnx_path,
        )
        for split, ds in (("train", train), ("test", test))
    )
    classes = {k: len(v) for k, v in data.CATEGORIES.items()}
    heads, _ = compare.train_heads(f_train, train.labels, classes, cfg, cfg.loss_weights, f"{backbone} MH")
    with torch.no_grad():
        logits = {k: h(torch.from_numpy(f_test)).argmax(1).numpy() for k, h in heads.items()}
    seen = ~test.unseen
    acc = {k: float((logits[k] == test.labels[k])[seen].mean()) for k in data.CATEGORIES}
    prov = {
        "command": f"shoal multihead --backbones {backbone} --export-split REPO",
        "data": {"generator": "shoal.multihead.data", "seed": cfg.seed, "train_sha256": train.checksum()},
        "backbone": backbone,
        "test_accuracy": acc,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    model = Classifier(net, heads)
    dev, clu = export_split(model, repo, backbone, prov, compare.to_input(test.images[:64]), version, overwrite)
    log(f"exported {dev} (device) and {clu} (cluster) in {time.perf_counter() - t0:.0f} s; test accuracy {acc}")
    return {"device": dev, "cluster": clu, "test_accuracy": acc, "features": int(f_train.shape[1])}
