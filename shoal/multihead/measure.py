"""What a model costs on an edge device: ONNX file size, parameters, MACs and latency.

- MACs are counted by ptflops (``backend="aten"``: it intercepts every ``aten.convolution``,
  ``aten.mm``/``addmm`` and similar call at dispatch time, so the EfficientNet package's padded
  convolution subclasses are counted like any other). Element-wise work (activations, batch norm,
  resizing, pooling) is not a multiply-accumulate and is not counted.
- Latency: ``shoal.multihead.latency`` (one pinned core, one thread, ONNX Runtime, in a fresh process).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shoal.train.publish import export_torch


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one input of ``input_shape`` (no batch dimension)."""
    from ptflops import get_model_complexity_info

    model.eval()
    with torch.no_grad():
        macs, _ = get_model_complexity_info(
            model,
            input_shape,
            print_per_layer_stat=False,
            as_strings=False,
            backend="aten",
            ost=io.StringIO(),
        )
    return int(macs or 0)


def export_onnx(
    model: nn.Module, path: Path, outputs: list[str], input_shape: tuple[int, ...], input_name: str = "image"
) -> Path:
    """ONNX with one input (``image``) and one named output per head, the batch dimension variable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_torch(model, path, {input_name: torch.zeros(1, *input_shape)}, outputs)


def ort_session(path: Path | str, threads: int = 1):  # noqa: ANN201 (onnxruntime is imported lazily)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(path: Path | str, x: np.ndarray, threads: int = 2, batch: int = 64) -> list[np.ndarray]:
    """Every output of the model over ``x`` [N, ...], in batches."""
    sess = ort_session(path, threads)
    chunks = [sess.run(None, {"image": x[i : i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]


def file_mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6
