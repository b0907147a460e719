"""Export a multi-head model to a model repository: ``<repo>/<name>/<version>/`` with ``model.onnx``
(input ``image`` FP32 [-1, 3, 28, 28], one output per head: ``digit`` [-1, 10], ``colour`` [-1, 6])
and a manifest listing both label sets, so a worker serves it and ``shoal infer`` prints both labels.

ONNX Runtime must agree with PyTorch on real test images before anything reaches the repository, and
the version folder is built aside and moved into place, so a worker never sees half of it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from shoal.modelrepo import ImageSpec, Manifest, ManifestError, TensorSpec, write_manifest
from shoal.multihead import data, measure
from shoal.multihead.models import Classifier
from shoal.train.export import next_version

MODEL_FILE = "model.onnx"
MAX_BATCH_SIZE = 64
BATCH_DELAY_MS = 2.0


def model_name(backbone: str) -> str:
    return f"coloured-digits-{backbone}"


def build_manifest(name: str, version: str, provenance: dict[str, Any]) -> Manifest:
    cats = data.CATEGORIES
    return Manifest(
        name=name,
        version=version,
        runtime="onnx",
        file=MODEL_FILE,
        inputs=(TensorSpec("image", "FP32", (-1, 3, data.SIZE, data.SIZE)),),
        outputs=tuple(TensorSpec(k, "FP32", (-1, len(v))) for k, v in cats.items()),
        max_batch_size=MAX_BATCH_SIZE,
        batch_delay_ms=BATCH_DELAY_MS,
        labels={k: list(v) for k, v in cats.items()},
        # The backbone resizes and normalises inside the graph: the worker only scales to [0, 1].
        image=ImageSpec(
            input="image",
            mode="RGB",
            size=(data.SIZE, data.SIZE),
            scale=1.0 / 255.0,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            layout="NCHW",
        ),
        provenance=provenance,
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

    if model.outputs != list(data.CATEGORIES):
        raise ValueError(
            f"a multi-head model with heads {list(data.CATEGORIES)} is needed, not {model.outputs}"
        )
    name = model_name(backbone)
    version = version or next_version(repo, name)
    dest = Path(repo) / name / version
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise ManifestError(f"{dest} already exists; pick another --version or pass --overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; workers may run as other users
    try:
        onnx = measure.export_onnx(model, tmp / MODEL_FILE, model.outputs, (3, data.SIZE, data.SIZE))
        diff = check_parity(model, onnx, parity_images)
        prov = dict(provenance)
        prov["onnx_parity"] = {"images": len(parity_images), "max_abs_diff": float(f"{diff:.3g}")}
        prov["onnx_opset"] = measure.OPSET
        write_manifest(tmp, build_manifest(name, version, prov))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest
