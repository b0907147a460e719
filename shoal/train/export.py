"""Export a trained MNIST model to ONNX in a model repository: ``<repo>/<dataset>-<arch>/<version>/``.

The version folder gets ``model.onnx`` and ``manifest.json`` (inputs, outputs, labels, batching, the
image preprocessing a worker applies to a raw PNG/JPEG, and provenance). Before the manifest is
written, ONNX Runtime's outputs on real test images are compared with PyTorch's: a model whose export
changed its answers never reaches the repository.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import shoal  # noqa: F401  (sets ORT_DISABLE_TELEMETRY before onnxruntime is imported)
from shoal.data import mnist as mnist_data
from shoal.modelrepo import ImageSpec, Manifest, ManifestError, TensorSpec, list_versions, write_manifest
from shoal.train.mnist_models import MEAN, STD

OPSET = 17
MODEL_FILE = "model.onnx"
MAX_BATCH_SIZE = 64
BATCH_DELAY_MS = 2.0
# float32 through different kernels: logits agree to ~1e-5; anything near 1e-3 means a wrong graph.
PARITY_ATOL = 1e-3


@dataclass(frozen=True)
class ParityReport:
    images: int
    max_abs_diff: float
    argmax_agree: float  # fraction of images whose predicted class is the same


def model_name(dataset: str, arch: str) -> str:
    return f"{dataset}-{arch}"


def next_version(repo: str | Path, name: str) -> str:
    numeric = [int(v) for v in list_versions(repo, name) if v.isdigit()]
    return str(max(numeric, default=0) + 1)


def export_onnx(model: nn.Module, path: Path) -> None:
    """ONNX with a variable batch dimension; the TorchScript-based exporter needs no onnxscript."""
    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation on every call
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def check_parity(model: nn.Module, onnx_path: Path, x: torch.Tensor) -> ParityReport:
    """Run the same batch through PyTorch and ONNX Runtime; raise if they disagree."""
    import onnxruntime as ort

    model.eval()
    with torch.no_grad():
        ref = model(x).numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"image": x.numpy()})[0]
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
    return Manifest(
        name=name,
        version=version,
        runtime="onnx",
        file=MODEL_FILE,
        inputs=(TensorSpec("image", "FP32", (-1, 1, 28, 28)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
        max_batch_size=MAX_BATCH_SIZE,
        batch_delay_ms=BATCH_DELAY_MS,
        labels={"logits": classes},
        image=ImageSpec(
            input="image", mode="L", size=(28, 28), scale=1.0 / 255.0, mean=(MEAN,), std=(STD,), layout="NCHW"
        ),
        provenance=prov,
    )


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
    version = version or next_version(repo, name)
    dest = Path(repo) / name / version
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise ManifestError(f"{dest} already exists; pick another --version or pass --overwrite")
    images, _ = mnist_data.load(dataset, "test", data_dir)
    x = to_tensor(images[:parity_images])
    # Build in a scratch folder next to the destination, then move: a half-written version is never
    # visible to a worker scanning the repository.
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; workers run as other users
    try:
        export_onnx(model, tmp / MODEL_FILE)
        report = check_parity(model, tmp / MODEL_FILE, x)
        prov = dict(provenance)
        prov["onnx_parity"] = {"images": report.images, "max_abs_diff": float(f"{report.max_abs_diff:.3g}")}
        prov["onnx_opset"] = OPSET
        classes = list(mnist_data.get_dataset(dataset).classes)
        write_manifest(tmp, build_manifest(name, version, classes, prov))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest, report
