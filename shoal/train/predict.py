"""``shoal predict``: the paper's inference script. Load a checkpoint or an exported model, predict
test images, print label and prediction, and draw them in a PNG grid.

An exported model (a version folder of a model repository) runs on ONNX Runtime with numpy only, the
way a worker serves it; a training checkpoint needs torch. Importing this module imports neither.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shoal.train.figures import pyplot, save

HELP = "predict MNIST test images with a checkpoint or an exported model; print and plot label vs prediction"
EXAMPLE = """\
shoal predict                                      # the bundled mnist-cnn, 10 random test images
shoal predict --model models/mnist-mlp/1 --count 25 --grid mlp.png
shoal predict --model runs/mnist-cnn --index 0 1 2  # a training checkpoint (needs torch)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="a model version folder (<repo>/<model>/<version>), a model folder (newest version), a run folder "
        "or a checkpoint .pt file (default: the bundled mnist-cnn)",
    )
    p.add_argument("--dataset", help="test images to use (default: the model's own dataset)")
    p.add_argument("--count", type=int, default=10, help="how many random test images (default: 10)")
    p.add_argument("--index", type=int, nargs="+", help="these test image indices instead of random ones")
    p.add_argument("--seed", type=int, help="seed of the random choice (default: different each run)")
    p.add_argument("--grid", default="predictions.png", help="PNG grid to write (default: predictions.png)")
    p.add_argument("--no-grid", action="store_true", help="print only")
    p.add_argument("--data-dir", help="folder with the original IDX files (also: SHOAL_DATA_DIR)")


@dataclass
class Predictor:
    """Callable on uint8 images [N, 28, 28] -> logits [N, C]."""

    kind: str  # "onnx" or "checkpoint"
    source: Path
    dataset: str
    classes: list[str]
    _run: object

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._run(images)  # type: ignore[operator]


def preprocess(
    images: np.ndarray, scale: float, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """uint8 [N, H, W] greyscale -> float32 [N, 1, H, W], as the manifest's image block says."""
    x = images.astype(np.float32) * np.float32(scale)
    x = (x - np.float32(mean[0])) / np.float32(std[0])
    return x[:, None, :, :]


def onnx_predictor(version_dir: Path) -> Predictor:
    import shoal  # noqa: F401  (disables ONNX Runtime telemetry before it is imported)
    from shoal.modelrepo import load_manifest

    m = load_manifest(version_dir)
    if m.runtime != "onnx" or m.image is None:
        raise ValueError(f"{version_dir}: shoal predict needs an ONNX image model with an 'image' block")
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(version_dir / m.file), so, providers=["CPUExecutionProvider"])
    img, out = m.image, m.outputs[0].name
    limit = m.max_batch_size or 1024

    def run(images: np.ndarray) -> np.ndarray:
        x = preprocess(images, img.scale, img.mean, img.std)
        return np.concatenate(
            [sess.run([out], {img.input: x[i : i + limit]})[0] for i in range(0, len(x), limit)]
        )

    dataset = str(m.provenance.get("dataset") or m.name.rsplit("-", 1)[0])
    classes = m.labels.get(out) or [str(i) for i in range(m.outputs[0].shape[-1])]
    return Predictor("onnx", version_dir, dataset, classes, run)


def checkpoint_predictor(path: Path) -> Predictor:
    import torch

    from shoal.data.mnist import get_dataset
    from shoal.train.mnist import model_from_checkpoint, to_tensor

    model, cfg, _ = model_from_checkpoint(path)

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(to_tensor(images)).numpy()

    return Predictor("checkpoint", path, cfg.dataset, list(get_dataset(cfg.dataset).classes), run)


def load_predictor(model: str | None) -> Predictor:
    from shoal.modelrepo import MANIFEST_NAME, list_versions

    if model is None:
        from shoal.bundled import bundled_repo

        return onnx_predictor(bundled_repo() / "mnist-cnn" / "1")
    p = Path(model)
    if p.is_file() and p.suffix == ".pt":
        return checkpoint_predictor(p)
    if (p / MANIFEST_NAME).is_file():
        return onnx_predictor(p)
    if p.is_dir() and (p / "checkpoint.pt").is_file():
        return checkpoint_predictor(p / "checkpoint.pt")
    versions = list_versions(p.parent, p.name) if p.is_dir() else []
    if versions:
        return onnx_predictor(p / versions[-1])
    raise FileNotFoundError(
        f"{p}: neither a checkpoint (.pt, or a run folder holding checkpoint.pt) nor a model repository "
        "folder (<repo>/<model>[/<version>] with manifest.json)"
    )


def save_grid(
    images: np.ndarray, labels: np.ndarray, preds: np.ndarray, classes: list[str], path: Path
) -> None:
    plt = pyplot()
    n = len(images)
    cols = min(n, 10)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im, y, p in zip(axes.flat, images, labels, preds, strict=True):
        ax.imshow(im, cmap="Greys", interpolation="nearest")
        ok = y == p
        ax.set_title(f"{classes[y]} / {classes[p]}", fontsize=8, color="green" if ok else "red")
    fig.suptitle("label / prediction", fontsize=10)
    save(fig, path)


def run(args: argparse.Namespace) -> int:
    from shoal.data.mnist import DatasetError, load
    from shoal.modelrepo import ManifestError

    try:
        pred = load_predictor(args.model)
        images, labels = load(args.dataset or pred.dataset, "test", args.data_dir)
    except (DatasetError, ManifestError, FileNotFoundError, ValueError) as e:
        print(f"shoal predict: {e}", file=sys.stderr)
        return 2
    if args.index:
        bad = [i for i in args.index if not 0 <= i < len(images)]
        if bad:
            print(f"shoal predict: indices {bad} outside 0..{len(images) - 1}", file=sys.stderr)
            return 2
        idx = np.array(args.index)
    else:
        rng = np.random.default_rng(args.seed)
        idx = rng.choice(len(images), size=min(args.count, len(images)), replace=False)
    logits = pred(images[idx])
    preds = logits.argmax(1)
    z = logits - logits.max(1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    print(f"model {pred.source} ({pred.kind}), {pred.dataset} test images")
    for i, y, p, pr in zip(idx, labels[idx], preds, prob, strict=True):
        mark = "" if y == p else "   <- wrong"
        print(f"image {i:5d}  label {pred.classes[y]}  prediction {pred.classes[p]}  ({pr[p]:.1%}){mark}")
    correct = int((labels[idx] == preds).sum())
    print(f"{correct}/{len(idx)} correct")
    if not args.no_grid:
        save_grid(images[idx], labels[idx], preds, pred.classes, Path(args.grid))
        print(f"wrote {args.grid}")
    return 0
