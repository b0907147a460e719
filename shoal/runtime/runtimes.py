"""Model runtimes a worker can host. Each loads one model version from its repository folder and
maps a dict of named input arrays to a dict of named output arrays. Framework imports happen inside
the runtime that needs them, so a worker installs only its own framework."""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

import shoal  # noqa: F401  (sets telemetry opt-outs before any framework is imported)
from shoal.devices import CUDA_EP, DeviceError, choose_onnx, torch_device
from shoal.modelrepo.manifest import Manifest


class RuntimeError_(RuntimeError):
    pass


class Runtime(ABC):
    name = "base"

    def __init__(self, model_dir: Path, manifest: Manifest, device: str = "cpu", threads: int = 1) -> None:
        self.model_dir = model_dir
        self.manifest = manifest
        self.device = device
        self.threads = threads

    @abstractmethod
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: named input arrays in, named output arrays out."""


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(self, model_dir: Path, manifest: Manifest, device: str = "cpu", threads: int = 1) -> None:
        super().__init__(model_dir, manifest, device, threads)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            choice, providers = choose_onnx(device, ort.get_available_providers())
        except DeviceError as e:
            raise RuntimeError_(str(e)) from None
        self.session = ort.InferenceSession(str(model_dir / manifest.file), so, providers=providers)
        # ONNX Runtime falls back to the CPU when CUDA cannot start (no driver, no such GPU): refuse
        # rather than serve from a device nobody asked for.
        if choice.kind == "cuda" and self.session.get_providers()[0] != CUDA_EP:
            raise RuntimeError_(
                f"device {device}: the CUDA provider did not start (no NVIDIA driver or no GPU {choice}); "
                "'shoal devices' lists what is here"
            )
        self.device = str(choice)
        self.output_names = [o.name for o in self.session.get_outputs()]
        names = {i.name for i in self.session.get_inputs()}
        want = {t.name for t in manifest.inputs}
        if names != want:
            raise RuntimeError_(
                f"ONNX model inputs {sorted(names)} differ from the manifest's {sorted(want)}"
            )

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(None, inputs)
        return dict(zip(self.output_names, outs, strict=True))


class TorchScriptRuntime(Runtime):
    name = "torchscript"

    def __init__(self, model_dir: Path, manifest: Manifest, device: str = "cpu", threads: int = 1) -> None:
        super().__init__(model_dir, manifest, device, threads)
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        try:
            self.dev = torch_device(device)
        except DeviceError as e:
            raise RuntimeError_(str(e)) from None
        self.device = str(self.dev)
        self.model = torch.jit.load(str(model_dir / manifest.file), map_location=self.dev).eval()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = [
            torch.from_numpy(np.ascontiguousarray(inputs[t.name])).to(self.dev) for t in self.manifest.inputs
        ]
        with torch.inference_mode():
            out = self.model(*args)
        if isinstance(out, dict):
            return {k: v.cpu().numpy() for k, v in out.items()}
        if not isinstance(out, (tuple, list)):
            out = (out,)
        return {t.name: o.cpu().numpy() for t, o in zip(self.manifest.outputs, out, strict=True)}


class SklearnRuntime(Runtime):
    """A pickled scikit-learn estimator. An output named ``probabilities`` comes from
    ``predict_proba``, ``scores`` from ``decision_function``, anything else from ``predict``.
    Only load model files you trust: unpickling runs code."""

    name = "sklearn"

    def __init__(self, model_dir: Path, manifest: Manifest, device: str = "cpu", threads: int = 1) -> None:
        super().__init__(model_dir, manifest, device, threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        with open(model_dir / manifest.file, "rb") as f:
            self.model = pickle.load(f)
        if len(manifest.inputs) != 1:
            raise RuntimeError_("the sklearn runtime takes exactly one input (the feature matrix)")

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs[self.manifest.inputs[0].name]
        x = x.reshape(x.shape[0], -1)
        out: dict[str, np.ndarray] = {}
        for t in self.manifest.outputs:
            if t.name == "probabilities":
                y = self.model.predict_proba(x)
            elif t.name == "scores":
                y = self.model.decision_function(x)
            else:
                y = self.model.predict(x)
            out[t.name] = np.asarray(y).astype(_np_dtype(t.datatype), copy=False)
        return out


def _np_dtype(datatype: str) -> Any:
    from shoal.protocol.tensors import NP_DTYPES

    return NP_DTYPES.get(datatype, np.float32)


class PythonRuntime(Runtime):
    """A handler class ``module:Class`` found in the version folder (or importable). It is built as
    ``Class(model_dir, manifest)`` and called with the dict of input arrays; it returns the outputs."""

    name = "python"

    def __init__(self, model_dir: Path, manifest: Manifest, device: str = "cpu", threads: int = 1) -> None:
        super().__init__(model_dir, manifest, device, threads)
        assert manifest.handler
        modname, _, clsname = manifest.handler.partition(":")
        if not clsname:
            raise RuntimeError_(f"handler '{manifest.handler}' must be 'module:Class'")
        sys.path.insert(0, str(model_dir))
        try:
            mod = importlib.import_module(modname)
        finally:
            sys.path.remove(str(model_dir))
        self.handler = getattr(mod, clsname)(model_dir, manifest)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.handler(inputs)


RUNTIMES: dict[str, type[Runtime]] = {
    "onnx": OnnxRuntime,
    "torchscript": TorchScriptRuntime,
    "sklearn": SklearnRuntime,
    "python": PythonRuntime,
}


def load_runtime(model_dir: Path, manifest: Manifest, device: str = "cpu", threads: int = 1) -> Runtime:
    cls = RUNTIMES.get(manifest.runtime)
    if cls is None:
        raise RuntimeError_(f"unknown runtime '{manifest.runtime}'")
    try:
        return cls(model_dir, manifest, device, threads)
    except ImportError as e:
        extra = {"onnx": "onnx", "torchscript": "torch", "sklearn": "sklearn"}.get(manifest.runtime, "")
        raise RuntimeError_(
            f"the {manifest.runtime} runtime needs a package that is not installed ({e.name}): "
            f"pip install 'shoal[{extra}]'"
        ) from None
