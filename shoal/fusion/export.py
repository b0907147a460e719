"""Publish a fused model into a model repository as a new version, with where it came from.

The fused model is paper 003's tanh MLP on the flattened input. It goes out as ONNX (the graph is
checked against the same weights in torch before the manifest is written) under
``<repo>/<name>/<next version>/``, with the inputs, outputs, labels and image decoding of a
*template* manifest (the model the sites' data is shaped for), and a provenance block naming the
sites, the fusion schedule, the rounds and the metric the sites measured. A worker started without
``--version`` serves the newest version, so the fused model is what devices get next.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shoal.modelrepo.manifest import ImageSpec, Manifest, ManifestError, TensorSpec, parse_manifest

MODEL_FILE = "model.onnx"
MAX_BATCH_SIZE = 64
BATCH_DELAY_MS = 2.0


def paper_template(dataset: str) -> Manifest:
    """The input and output of a model trained on one of paper 003's bundled data sets.

    MNIST-like images are scaled to [0, 1] without centring, as ``datasets.load`` does; the tabular
    sets take the standardised feature vector.
    """
    from shoal.fusion import datasets

    d = datasets.load(dataset)
    classes = [str(c) for c in range(d.n_classes)]
    if dataset in ("mnist", "fashion"):
        inputs = (TensorSpec("image", "FP32", (-1, 1, 28, 28)),)
        image: ImageSpec | None = ImageSpec(input="image", mode="L", size=(28, 28), scale=1 / 255)
    else:
        inputs = (TensorSpec("x", "FP32", (-1, d.n_features)),)
        image = None
    return Manifest(
        name=f"{dataset}-fused",
        version="0",
        runtime="onnx",
        file=MODEL_FILE,
        inputs=inputs,
        outputs=(TensorSpec("logits", "FP32", (-1, d.n_classes)),),
        max_batch_size=MAX_BATCH_SIZE,
        batch_delay_ms=BATCH_DELAY_MS,
        labels={"logits": classes},
        image=image,
    )


def load_template(spec: str) -> Manifest:
    """``paper:<data set>``, a model version folder, or a ``manifest.json`` to take the input format from."""
    if spec.startswith("paper:"):
        return paper_template(spec.removeprefix("paper:"))
    path = Path(spec)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{spec}: not a model version folder or manifest.json ({e})") from None
    m = parse_manifest(raw, str(path))
    if not m.labels.get(m.outputs[0].name):
        raise ManifestError(f"{path}: output {m.outputs[0].name!r} has no labels; fusion trains a classifier")
    return m


def input_size(template: Manifest) -> int:
    shape = template.inputs[0].shape[1:] if template.max_batch_size > 0 else template.inputs[0].shape
    if any(s < 1 for s in shape):
        raise ManifestError(f"{template.name}: the input's shape {list(shape)} must be fixed past the batch")
    return int(np.prod(shape))


def classes(template: Manifest) -> list[str]:
    return list(template.labels[template.outputs[0].name])


def mlp_module(weights: Sequence[np.ndarray], input_shape: Sequence[int]) -> Any:
    """The torch module of a fused peer: flatten, then ``x @ W + b`` with tanh between layers."""
    import torch
    from torch import nn

    layers: list[nn.Module] = [nn.Flatten()]
    for k in range(0, len(weights), 2):
        w, b = np.asarray(weights[k], np.float32), np.asarray(weights[k + 1], np.float32)
        lin = nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        layers += [lin, nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    model.eval()
    model.input_shape = tuple(input_shape)  # type: ignore[assignment]
    return model


def export_fused(
    repo: str | Path,
    name: str,
    weights: Sequence[np.ndarray],
    template: Manifest,
    provenance: dict[str, Any],
    version: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``<repo>/<name>/<version>/`` (the next integer version by default) and return it."""
    from shoal.train.publish import OPSET, export_torch, publish, torch_parity

    spec = template.inputs[0]
    shape = spec.shape[1:] if template.max_batch_size > 0 else spec.shape
    out = template.outputs[0]
    model = mlp_module(weights, shape)
    if model[-1].out_features != len(classes(template)):
        raise ManifestError(
            f"the fused model has {model[-1].out_features} outputs but {template.name} names "
            f"{len(classes(template))} classes"
        )

    def build(folder: Path, ver: str) -> Manifest:
        import torch

        export_torch(model, folder / MODEL_FILE, {spec.name: torch.zeros(1, *shape)}, [out.name])
        probe = np.random.default_rng(0).normal(size=(16, *shape)).astype(np.float32)
        parity = torch_parity(model, folder / MODEL_FILE, {spec.name: probe}, classify=True)
        prov = {**provenance, "onnx_opset": OPSET, "onnx_parity": parity}
        return Manifest(
            name=name,
            version=ver,
            runtime="onnx",
            file=MODEL_FILE,
            inputs=(TensorSpec(spec.name, "FP32", (-1, *shape)),),
            outputs=(TensorSpec(out.name, "FP32", (-1, len(classes(template)))),),
            max_batch_size=template.max_batch_size or MAX_BATCH_SIZE,
            batch_delay_ms=template.batch_delay_ms or BATCH_DELAY_MS,
            labels={out.name: classes(template)},
            image=template.image,
            provenance=prov,
        )

    return publish(repo, name, version, overwrite, build)
