"""Export a multi-head model to a model repository: ``<repo>/<name>/<version>/`` with ``model.onnx``
(input ``image`` FP32 [-1, 3, 28, 28], one output per head: ``digit`` [-1, 10], ``colour`` [-1, 6])
and a manifest listing both label sets, so a worker serves it and ``shoal infer`` prints both labels.

ONNX Runtime must agree with PyTorch on real test images before anything reaches the repository. It
is written as every trained model is (``shoal.train.publish``): names checked, the version folder
built aside and moved into place, so a worker never sees half of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shoal.modelrepo import ImageSpec, Manifest, TensorSpec
from shoal.multihead import data, measure
from shoal.multihead.models import Classifier
from shoal.train.publish import MODEL_FILE, OPSET, manifest, publish

# The backbone resizes and normalises inside the graph: the worker only scales to [0, 1].
IMAGE = ImageSpec(
    input="image",
    mode="RGB",
    size=(data.SIZE, data.SIZE),
    scale=1.0 / 255.0,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    layout="NCHW",
)


def model_name(backbone: str) -> str:
    return f"coloured-digits-{backbone}"


def build_manifest(name: str, version: str, provenance: dict[str, Any]) -> Manifest:
    cats = data.CATEGORIES
    inputs = [TensorSpec("image", "FP32", (-1, 3, data.SIZE, data.SIZE))]
    outputs = [TensorSpec(k, "FP32", (-1, len(v))) for k, v in cats.items()]
    return manifest(name, version, inputs, outputs, provenance, {k: list(v) for k, v in cats.items()}, IMAGE)


def check_heads(model: Classifier) -> None:
    if model.outputs != list(data.CATEGORIES):
        raise ValueError(
            f"a multi-head model with heads {list(data.CATEGORIES)} is needed, not {model.outputs}"
        )


def export_to_repo(
    model: Classifier,
    repo: str | Path,
    backbone: str,
    provenance: dict[str, Any],
    parity_images: torch.Tensor,
    version: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``<repo>/coloured-digits-<backbone>/<version>/`` (next free integer version by default)."""
    from shoal.multihead.compare import check_parity

    check_heads(model)
    name = model_name(backbone)

    def build(folder: Path, v: str) -> Manifest:
        onnx = measure.export_onnx(model, folder / MODEL_FILE, model.outputs, (3, data.SIZE, data.SIZE))
        diff = check_parity(model, onnx, parity_images)
        prov = dict(provenance)
        prov["onnx_parity"] = {"images": len(parity_images), "max_abs_diff": float(f"{diff:.3g}")}
        prov["onnx_opset"] = OPSET
        return build_manifest(name, v, prov)

    return publish(repo, name, version, overwrite, build)
