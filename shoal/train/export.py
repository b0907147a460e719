"""Export a trained MNIST model to ONNX in a model repository: ``<repo>/<dataset>-<arch>/<version>/``.

The version folder gets ``model.onnx`` and ``manifest.json`` (inputs, outputs, labels, batching, the
image preprocessing a worker applies to a raw PNG/JPEG, and provenance). Before the manifest is
written, ONNX Runtime's outputs on real test images are compared with PyTorch's: a model whose export
changed its answers never reaches the repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import shoal  # noqa: F401  (sets ORT_DISABLE_TELEMETRY before onnxruntime is imported)
from shoal.data import mnist as mnist_data
from shoal.modelrepo import ImageSpec, Manifest, TensorSpec
from shoal.train.mnist_models import MEAN, STD
from shoal.train.publish import (
    MODEL_FILE,
    OPSET,
    PARITY_ATOL,
    export_torch,
    manifest,
    next_version,
    publish,
    run_onnx,
)

__all__ = ["export_to_repo", "next_version"]


@dataclass(frozen=True)
class ParityReport:
    images: int
    max_abs_diff: float
    argmax_agree: float  # fraction of images whose predicted class is the same


def model_name(dataset: str, arch: str) -> str:
    return f"{dataset}-{arch}"


def export_onnx(model: nn.Module, path: Path) -> None:
    """ONNX with a variable batch dimension."""
    export_torch(model, path, {"image": torch.zeros(1, 1, 28, 28)}, ["logits"])


def check_parity(model: nn.Module, onnx_path: Path, x: torch.Tensor) -> ParityReport:
    """Run the same batch through PyTorch and ONNX Runtime; raise if they disagree."""
    model.eval()
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_onnx(onnx_path, {"image": x.numpy()})["logits"]
    diff = float(np.abs(ref - got).max())
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    report = ParityReport(len(x), diff, agree)
    if diff > PARITY_ATOL or agree < 1.0:
        raise RuntimeError(
            f"ONNX and PyTorch disagree on {len(x)} test images: max |diff| {diff:.2e} "
            f"(allowed {PARITY_ATOL:.0e}), same class on {agree:.2%}"
        )
    return report


def build_manifest(name: str, version: str, classes: list[str], prov: dict[str, Any]) -> Manifest:
    inputs = [TensorSpec("image", "FP32", (-1, 1, 28, 28))]
    outputs = [TensorSpec("logits", "FP32", (-1, 10))]
    image = ImageSpec(
        input="image", mode="L", size=(28, 28), scale=1.0 / 255.0, mean=(MEAN,), std=(STD,), layout="NCHW"
    )
    return manifest(name, version, inputs, outputs, prov, {"logits": classes}, image)


def export_to_repo(
    model: nn.Module,
    repo: str | Path,
    dataset: str,
    arch: str,
    provenance: dict[str, Any],
    version: str | None = None,
    overwrite: bool = False,
    data_dir: str | None = None,
    parity_images: int = 256,
) -> tuple[Path, ParityReport]:
    """Write ``<repo>/<dataset>-<arch>/<version>/`` (next free integer version by default)."""
    from shoal.train.mnist import to_tensor

    name = model_name(dataset, arch)
    images, _ = mnist_data.load(dataset, "test", data_dir)
    x = to_tensor(images[:parity_images])
    classes = list(mnist_data.get_dataset(dataset).classes)
    reports: list[ParityReport] = []

    def build(folder: Path, version: str) -> Manifest:
        export_onnx(model, folder / MODEL_FILE)
        report = check_parity(model, folder / MODEL_FILE, x)
        reports.append(report)
        prov = dict(provenance)
        prov["onnx_parity"] = {"images": report.images, "max_abs_diff": float(f"{report.max_abs_diff:.3g}")}
        prov["onnx_opset"] = OPSET
        return build_manifest(name, version, classes, prov)

    return publish(repo, name, version, overwrite, build), reports[0]
