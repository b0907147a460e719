"""The model repository: ``<repo>/<model>/<version>/`` holding a model file and ``manifest.json``.

The manifest is the contract between whoever trains a model and whoever serves it. It says what the
model is (name, version, runtime, file), what goes in and out (tensor names, datatypes in the Open
Inference Protocol's spelling, shapes with ``-1`` for a variable dimension, the first one being the
batch dimension when ``max_batch_size > 0``), how the worker batches it, the class labels of each
output, how a raw image is turned into the input tensor, and where the model came from.

Pure data and validation; reading a folder is the only I/O here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from shoal.modelrepo.versions import version_key
from shoal.protocol.interface import DATATYPES, ModelInterface, TensorSpec
from shoal.protocol.names import RULE, InvalidName, check_name, valid_name
from shoal.typed import convert

MANIFEST_NAME = "manifest.json"
RUNTIMES = ("onnx", "torchscript", "sklearn", "python")


class ManifestError(ValueError):
    """A manifest that cannot be served; the message names the file and the key."""


@dataclass(frozen=True)
class ImageSpec:
    """How a raw image (JPEG/PNG bytes) becomes the model's input tensor, done in the worker."""

    input: str
    mode: str = "L"  # Pillow mode: "L" greyscale, "RGB"
    size: tuple[int, int] = (28, 28)  # width, height
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    # Pixels one request's images may hold in all (summed over its batch, read from their headers
    # before any is decoded). None: ``pixel_budget`` picks one that fits the model's input.
    max_pixels: int | None = None


# A 4K UHD frame: any camera frame a device sends, whatever the model's input size.
DEFAULT_MIN_PIXEL_BUDGET = 3840 * 2160


def pixel_budget(image: ImageSpec, max_batch_size: int) -> int:
    """The pixels one request's images may hold in all: the manifest's ``image.max_pixels``, else the
    larger of a 4K frame and four times a full batch of the model's input. Decoding costs time in
    proportion to pixels, on the worker's one inference thread; this bounds what one request can
    make every other request on that worker wait."""
    if image.max_pixels is not None:
        return image.max_pixels
    w, h = image.size
    return max(DEFAULT_MIN_PIXEL_BUDGET, 4 * max(1, max_batch_size) * w * h)


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    runtime: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    batch_delay_ms: float = 0.0
    labels: dict[str, list[str]] = field(default_factory=dict)
    image: ImageSpec | None = None
    handler: str | None = None  # "module:Class" for the python runtime
    provenance: dict[str, Any] = field(default_factory=dict)
    platform: str = ""
    # What each position along an input's last axis means, in order (name and unit): how to call a
    # model whose input is a row of features (input name -> one description per feature).
    features: dict[str, list[str]] = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def interface(self) -> ModelInterface:
        """What a worker of this version announces when it joins a gateway (and what a gateway knows
        of a version before any worker joins): names, tensors, batching, labels."""
        return ModelInterface(
            self.name,
            self.version,
            tuple(self.inputs),
            tuple(self.outputs),
            self.max_batch_size,
            self.image.input if self.image else None,
            dict(self.labels),
            self.runtime,
            self.batch_delay_ms,
        )

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "runtime": self.runtime,
            "file": self.file,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "max_batch_size": self.max_batch_size,
            "batch_delay_ms": self.batch_delay_ms,
            "labels": self.labels,
            "provenance": self.provenance,
        }
        if self.features:
            d["features"] = self.features
        if self.image is not None:
            img = asdict(self.image)
            img["size"] = list(self.image.size)
            img["mean"] = list(self.image.mean)
            img["std"] = list(self.image.std)
            if img["max_pixels"] is None:
                del img["max_pixels"]
            d["image"] = img
        if self.handler:
            d["handler"] = self.handler
        return d


class _TensorDoc(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    datatype: str
    shape: list[int]


class _ImageDoc(msgspec.Struct, forbid_unknown_fields=True):
    input: str
    mode: str = "L"
    size: tuple[int, int] = (28, 28)
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    max_pixels: int | None = None


class _ManifestDoc(msgspec.Struct, kw_only=True):
    """``manifest.json`` as a document: types checked by msgspec (its errors name the key), meaning
    checked by ``parse_manifest``. Unknown keys are allowed: tools may add their own."""

    name: str
    version: str | int
    runtime: str
    inputs: list[_TensorDoc]
    outputs: list[_TensorDoc]
    file: str = ""
    max_batch_size: int = 0
    batch_delay_ms: float = 0.0
    labels: dict[str, list[str]] | list[str] | None = None
    image: _ImageDoc | None = None
    handler: str | None = None
    provenance: dict[str, Any] | None = None
    platform: str = ""
    features: dict[str, list[str]] | None = None


def _tensors(items: list[_TensorDoc], where: str) -> tuple[TensorSpec, ...]:
    if not items:
        raise ManifestError(f"{where}: must be a non-empty list of tensors")
    out = []
    for i, t in enumerate(items):
        w = f"{where}[{i}]"
        if not t.name:
            raise ManifestError(f"{w}.name: must be a non-empty string")
        if t.datatype not in DATATYPES:
            raise ManifestError(f"{w}.datatype: '{t.datatype}' is not one of {', '.join(DATATYPES)}")
        if not all(s >= -1 for s in t.shape):
            raise ManifestError(f"{w}.shape: must be a list of integers, -1 for a variable dimension")
        out.append(TensorSpec(t.name, t.datatype, tuple(t.shape)))
    if len({t.name for t in out}) != len(out):
        raise ManifestError(f"{where}: tensor names must be unique")
    return tuple(out)


def parse_manifest(d: Any, where: str = "manifest") -> Manifest:
    """Validate a decoded manifest; every error names the key that is wrong."""
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: must be a JSON object")
    doc = convert(d, _ManifestDoc, where, ManifestError)
    name, version, runtime, file = doc.name, str(doc.version), doc.runtime, doc.file
    if not valid_name(name):
        raise ManifestError(f"{where}.name: {name!r:.80} must be {RULE}")
    if not valid_name(version):
        raise ManifestError(f"{where}.version: {version!r:.80} must be {RULE}")
    if runtime not in RUNTIMES:
        raise ManifestError(f"{where}.runtime: '{runtime}' is not one of {', '.join(RUNTIMES)}")
    if runtime != "python" and not file:
        raise ManifestError(f"{where}.file: the {runtime} runtime needs a model file")
    if file and (Path(file).is_absolute() or ".." in Path(file).parts):
        raise ManifestError(f"{where}.file: must be a path inside the version folder")
    inputs = _tensors(doc.inputs, f"{where}.inputs")
    outputs = _tensors(doc.outputs, f"{where}.outputs")
    mbs = doc.max_batch_size
    if mbs < 0:
        raise ManifestError(f"{where}.max_batch_size: must be an integer >= 0")
    if mbs > 0:
        for t in inputs + outputs:
            if not t.shape or t.shape[0] != -1:
                raise ManifestError(
                    f"{where}: tensor '{t.name}' must have -1 as its first (batch) dimension "
                    "when max_batch_size > 0"
                )
    if not 0 <= doc.batch_delay_ms <= 10_000:
        raise ManifestError(f"{where}.batch_delay_ms: must be a number of milliseconds in [0, 10000]")
    labels = doc.labels or {}
    if isinstance(labels, list):  # shorthand: labels of the first output
        labels = {outputs[0].name: labels}
    for k in labels:
        if k not in {t.name for t in outputs}:
            raise ManifestError(f"{where}.labels: '{k}' is not an output")
    features = doc.features or {}
    for k, names in features.items():
        t = next((t for t in inputs if t.name == k), None)
        if t is None:
            raise ManifestError(f"{where}.features: '{k}' is not an input")
        if not t.shape or t.shape[-1] not in (-1, len(names)):
            raise ManifestError(
                f"{where}.features.{k}: {len(names)} features for an input whose last dimension is "
                f"{t.shape[-1] if t.shape else 'absent'}"
            )
    image = None
    if doc.image is not None:
        im, w = doc.image, f"{where}.image"
        if im.input not in {t.name for t in inputs}:
            raise ManifestError(f"{w}.input: '{im.input}' is not an input")
        if im.mode not in ("L", "RGB") or im.layout not in ("NCHW", "NHWC"):
            raise ManifestError(f"{w}: mode must be L or RGB, layout NCHW or NHWC, size [width, height]")
        if im.max_pixels is not None and im.max_pixels < 1:
            raise ManifestError(f"{w}.max_pixels: must be a positive number of pixels (or absent)")
        image = ImageSpec(
            im.input, im.mode, im.size, im.scale, tuple(im.mean), tuple(im.std), im.layout, im.max_pixels
        )
    if runtime == "python" and not doc.handler:
        raise ManifestError(f"{where}.handler: the python runtime needs 'module:Class'")
    return Manifest(
        name=name,
        version=version,
        runtime=runtime,
        file=file,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=mbs,
        batch_delay_ms=float(doc.batch_delay_ms),
        labels=labels,
        image=image,
        handler=doc.handler,
        provenance=doc.provenance or {},
        platform=doc.platform,
        features=features,
    )


def load_manifest(version_dir: str | Path) -> Manifest:
    path = Path(version_dir) / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(
            f"{path}: no manifest here; a model version folder needs {MANIFEST_NAME}"
        ) from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    m = parse_manifest(raw, str(path))
    if m.file and not (Path(version_dir) / m.file).is_file():
        raise ManifestError(f"{path}: model file '{m.file}' is missing")
    return m


def write_manifest(version_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(version_dir) / MANIFEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    parse_manifest(manifest.to_json(), str(path))  # never write what we could not read back
    path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return path


def _inside(repo: Path, path: Path) -> bool:
    """Whether ``path``, symbolic links followed, lies inside ``repo`` (also resolved)."""
    try:
        return path.resolve().is_relative_to(repo.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def list_versions(repo: str | Path, model: str) -> list[str]:
    """Versions of a model present in a repository, oldest first (numeric versions sort numerically).
    Folders whose names are not valid versions, and folders that lead outside the repository through
    a symbolic link, are not versions."""
    try:
        check_name(model)
    except InvalidName as e:
        raise ManifestError(str(e)) from None
    root = Path(repo)
    d = root / model
    if not d.is_dir() or not _inside(root, d):
        return []
    vs = [p.name for p in d.iterdir() if valid_name(p.name) and (p / MANIFEST_NAME).is_file() and _inside(root, p)]
    return sorted(vs, key=version_key)


def resolve(repo: str | Path, model: str, version: str | None = None) -> tuple[Path, Manifest]:
    """Find ``<repo>/<model>/<version>`` (newest version when none is given) and load its manifest.
    ``ManifestError`` for a name or version that is not valid (``names.py``), or a model folder that
    resolves outside the repository: nothing outside it is opened."""
    try:
        check_name(model)
        if version is not None:
            check_name(version, "model version")
    except InvalidName as e:
        raise ManifestError(str(e)) from None
    versions = list_versions(repo, model)
    if not versions:
        raise ManifestError(f"{Path(repo) / model}: no versions of model '{model}' in repository '{repo}'")
    v = version or versions[-1]
    if v not in versions:
        raise ManifestError(f"model '{model}' has no version '{v}' in '{repo}' (has: {', '.join(versions)})")
    d = Path(repo) / model / v
    return d, load_manifest(d)
