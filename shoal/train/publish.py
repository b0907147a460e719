"""Publishing a trained model into a model repository: ``<repo>/<name>/<version>/`` with
``model.onnx`` and ``manifest.json``.

- torch models go through torch's ONNX exporter (the TorchScript-based one: no onnxscript needed),
  scikit-learn models through skl2onnx;
- before the manifest is written, ONNX Runtime runs the exported file on real test inputs and must
  agree with the trained model (:func:`torch_parity`, :func:`sklearn_parity`): a model whose export
  changed its answers never reaches the repository;
- the version folder is built aside and moved into place (:func:`publish`; :func:`publish_together`
  for a set of models under one version), so a worker scanning the repository never sees half of
  one, and an existing version is never replaced without ``overwrite``.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import shoal  # noqa: F401  (sets ORT_DISABLE_TELEMETRY before onnxruntime is imported)
from shoal.modelrepo import ImageSpec, Manifest, ManifestError, TensorSpec, list_versions, write_manifest
from shoal.modelrepo.versions import is_number
from shoal.protocol.names import InvalidName, check_name

OPSET = 17
MODEL_FILE = "model.onnx"
# float32 through different kernels agrees to ~1e-5; anything near 1e-3 means a wrong graph.
PARITY_ATOL = 1e-3


def next_version(repo: str | Path, name: str) -> str:
    numeric = [int(v) for v in list_versions(repo, name) if is_number(v)]
    return str(max(numeric, default=0) + 1)


def publish(
    repo: str | Path,
    name: str,
    version: str | None,
    overwrite: bool,
    build: Callable[[Path, str], Manifest],
) -> Path:
    """Make ``<repo>/<name>/<version>/`` (the next integer version by default): ``build(folder,
    version)`` writes the model file(s) into a scratch folder, checks them, and returns the manifest."""
    (dest,) = publish_together(repo, [name], version, overwrite, lambda folders, v: [build(folders[0], v)])
    return dest


def publish_together(
    repo: str | Path,
    names: list[str],
    version: str | None,
    overwrite: bool,
    build: Callable[[list[Path], str], list[Manifest]],
) -> list[Path]:
    """:func:`publish` for models that only work as a set (a model cut in two): one version for all,
    by default the first integer free for every name; ``build(folders, version)`` writes and checks
    them all before any is moved into place."""
    try:  # every training command and federation publish through here: no name leaves the repository
        for name in names:
            check_name(name)
        if version:
            version = check_name(version, "model version")
        else:
            version = str(max(int(next_version(repo, name)) for name in names))
    except InvalidName as e:
        raise ManifestError(str(e)) from None
    dests = [Path(repo) / name / version for name in names]
    for dest in dests:
        if dest.exists() and any(dest.iterdir()) and not overwrite:
            raise ManifestError(f"{dest} already exists; pick another --version or pass --overwrite")
        dest.parent.mkdir(parents=True, exist_ok=True)
    tmps: list[Path] = []
    try:
        for dest in dests:
            tmps.append(Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dest.parent)))
            tmps[-1].chmod(0o755)  # mkdtemp makes it private; workers may run as other users
        for tmp, man in zip(tmps, build(tmps, version), strict=True):
            write_manifest(tmp, man)
        for tmp, dest in zip(tmps, dests, strict=True):
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
    finally:
        for tmp in tmps:
            if tmp.exists():
                shutil.rmtree(tmp)
    return dests


# ------------------------------------------------------------------------------------------ torch


def export_torch(
    model: Any,
    path: Path,
    inputs: dict[str, Any],
    outputs: list[str],
    dynamic: dict[str, dict[int, str]] | None = None,
) -> Path:
    """ONNX of a torch module called as ``model(*inputs.values())``; the first dimension of every
    input and output is the batch, variable, plus whatever ``dynamic`` adds (a sequence length)."""
    import torch

    model.eval()
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in [*inputs, *outputs]}
    for k, v in (dynamic or {}).items():
        axes[k] = {**axes.get(k, {}), **v}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation on every call
        torch.onnx.export(
            model,
            tuple(inputs.values()),
            str(path),
            input_names=list(inputs),
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return path


def ort_session(path: Path | str, threads: int = 2) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(path: Path | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort_session(path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds), strict=True))


def torch_parity(
    model: Any, path: Path, feeds: dict[str, np.ndarray], classify: bool = False, atol: float = PARITY_ATOL
) -> dict[str, Any]:
    """Run the same inputs through torch and ONNX Runtime; raise when they disagree (by more than
    ``atol`` times the outputs' scale anywhere, or, for a classifier, on any predicted class)."""
    import torch

    model.eval()
    with torch.no_grad():
        ref = model(*(torch.from_numpy(v) for v in feeds.values()))
    ref_list = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    got = list(run_onnx(path, feeds).values())
    diff = max(float(np.abs(r.numpy() - g).max()) for r, g in zip(ref_list, got, strict=True))
    # Outputs in large units (megawatts) carry float32's relative error: compare relative to them.
    scale = max([1.0] + [float(r.abs().max()) for r in ref_list])
    rows = len(next(iter(feeds.values())))
    same = all((r.numpy().argmax(-1) == g.argmax(-1)).all() for r, g in zip(ref_list, got, strict=True))
    if diff > atol * scale or (classify and not same):
        raise RuntimeError(
            f"ONNX and PyTorch disagree on {rows} test inputs: max |diff| {diff:.2e} "
            f"(allowed {atol * scale:.1e}){', and on a predicted class' if classify and not same else ''}"
        )
    return {"inputs": rows, "max_abs_diff": float(f"{diff:.3g}"), "output_scale": float(f"{scale:.3g}")}


# ------------------------------------------------------------------------------------------ scikit-learn


def export_sklearn(estimator: Any, path: Path, n_features: int, input_name: str = "features") -> Path:
    """ONNX of a fitted scikit-learn estimator through skl2onnx: input ``features`` FP32
    [-1, n_features]; classifiers output ``label`` INT64 [-1] and ``probabilities`` FP32 [-1, C] (no
    ZipMap, so the outputs are plain tensors), k-means ``label`` and ``scores`` (distances)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    options = {id(estimator): {"zipmap": False}} if hasattr(estimator, "predict_proba") else None
    onx = to_onnx(
        estimator,
        initial_types=[(input_name, FloatTensorType([None, n_features]))],
        options=options,
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    path.write_bytes(onx.SerializeToString())
    return path


def sklearn_parity(estimator: Any, path: Path, x: np.ndarray, input_name: str = "features") -> dict[str, Any]:
    """ONNX Runtime against scikit-learn on the same rows: the same predicted label on every row
    (cluster or class; float32 in ONNX may move a point lying exactly between two, which is refused)."""
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    out = run_onnx(path, {input_name: x32})
    want = estimator.predict(x32.astype(np.float64))
    agree = float((out["label"].reshape(-1) == want).mean())
    report: dict[str, Any] = {"inputs": len(x), "label_agreement": agree}
    if "probabilities" in out and hasattr(estimator, "predict_proba"):
        diff = float(np.abs(out["probabilities"] - estimator.predict_proba(x32.astype(np.float64))).max())
        report["max_abs_diff"] = float(f"{diff:.3g}")
        if diff > PARITY_ATOL:
            agree = 0.0
    if agree < 1.0:
        raise RuntimeError(f"ONNX and scikit-learn disagree on {len(x)} test rows: {report}")
    return report


# ------------------------------------------------------------------------------------------ publishers


def manifest(
    name: str,
    version: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    provenance: dict[str, Any],
    labels: dict[str, list[str]] | None = None,
    image: ImageSpec | None = None,
    max_batch_size: int = 64,
    batch_delay_ms: float = 2.0,
    features: dict[str, list[str]] | None = None,
) -> Manifest:
    return Manifest(
        name=name,
        version=version,
        runtime="onnx",
        file=MODEL_FILE,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        max_batch_size=max_batch_size,
        batch_delay_ms=batch_delay_ms,
        labels=labels or {},
        image=image,
        provenance=provenance,
        features=features or {},
    )


def sklearn_publisher(
    estimator: Any,
    name: str,
    check: np.ndarray,
    outputs: list[TensorSpec],
    labels: dict[str, list[str]] | None = None,
) -> Callable[[str, str | None, bool, dict[str, Any]], Path]:
    """``publish(repo, version, overwrite, provenance)`` for a fitted scikit-learn estimator, checked
    against ONNX Runtime on the rows ``check``."""
    n_features = check.shape[1]

    def publish_to(repo: str, version: str | None, overwrite: bool, prov: dict[str, Any]) -> Path:
        def build(folder: Path, v: str) -> Manifest:
            export_sklearn(estimator, folder / MODEL_FILE, n_features)
            parity = sklearn_parity(estimator, folder / MODEL_FILE, check)
            inputs = [TensorSpec("features", "FP32", (-1, n_features))]
            return manifest(name, v, inputs, outputs, {**prov, "onnx_parity": parity, "onnx_opset": OPSET}, labels)

        return publish(repo, name, version, overwrite, build)

    return publish_to


def torch_publisher(
    model: Any,
    name: str,
    feeds: dict[str, np.ndarray],
    outputs: list[TensorSpec],
    labels: dict[str, list[str]] | None = None,
    classify: bool = False,
    dynamic: dict[str, dict[int, str]] | None = None,
    image: ImageSpec | None = None,
    features: dict[str, list[str]] | None = None,
) -> Callable[[str, str | None, bool, dict[str, Any]], Path]:
    """``publish(repo, version, overwrite, provenance)`` for a trained torch module (on the CPU),
    checked against ONNX Runtime on the test inputs ``feeds``; input shapes come from ``feeds`` with
    a variable first (batch) dimension and whatever ``dynamic`` marks variable too."""
    import torch

    def spec(k: str, v: np.ndarray) -> TensorSpec:
        shape = [-1, *v.shape[1:]]
        for axis in (dynamic or {}).get(k, {}):
            shape[axis] = -1
        return TensorSpec(k, DATATYPE[v.dtype.name], tuple(shape))

    def publish_to(repo: str, version: str | None, overwrite: bool, prov: dict[str, Any]) -> Path:
        def build(folder: Path, v: str) -> Manifest:
            example = {k: torch.from_numpy(a[:1]) for k, a in feeds.items()}
            export_torch(model, folder / MODEL_FILE, example, [o.name for o in outputs], dynamic)
            parity = torch_parity(model, folder / MODEL_FILE, feeds, classify)
            inputs = [spec(k, a) for k, a in feeds.items()]
            extra = {"onnx_parity": parity, "onnx_opset": OPSET}
            return manifest(name, v, inputs, outputs, {**prov, **extra}, labels, image, features=features)

        return publish(repo, name, version, overwrite, build)

    return publish_to


DATATYPE = {"float32": "FP32", "int64": "INT64", "float64": "FP64", "int32": "INT32", "uint8": "UINT8"}
