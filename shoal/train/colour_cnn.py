"""Paper 002, chapter 6, example 2: a convolutional network on colour images (the CIFAR-10 example).

    shoal train colour-cnn --export models/

CIFAR-10 cannot be installed on these machines (no package ships it, nothing may be downloaded), so
the nearest colour image set that can be built here stands in: Fashion-MNIST's ten kinds of garment,
each drawn in a random hue over a random dark background (plain, a gradient or noise), 28x28 RGB
(``shoal.train.data.coloured_fashion``, deterministic). Like CIFAR-10 it is ten object classes in
colour where the colour says nothing about the class; unlike it, the objects are centred and upright
on simple backgrounds, so it is easier (see docs/catalogue.md).

The network follows the book's CIFAR-10 example (TFLearn): 3x3 conv 32, max-pool, 3x3 conv 64, 3x3
conv 64, max-pool, fully connected 512, dropout 0.5, 10 outputs; training images are flipped left to
right at random. ``predictions.png`` shows test images with their label and prediction.

Served as "which class": input ``image`` FP32 [-1, 3, 28, 28] in [0, 1] (a worker decodes a PNG or
JPEG that way: the manifest's image block), output ``logits`` FP32 [-1, 10], labels the garments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shoal.modelrepo import ImageSpec, TensorSpec
from shoal.train.catalogue import Publisher, Run, Trained
from shoal.train.data import Images, coloured_fashion
from shoal.train.figures import pyplot, save
from shoal.train.loop import begin, plot_history
from shoal.train.publish import torch_publisher


@dataclass
class Config:
    data: str = "coloured-fashion"  # the CIFAR-10 stand-in (the only choice)
    train_images: int = 20000  # drawn from Fashion-MNIST's 60 000 training images
    test_images: int = 5000  # drawn from its 10 000 test images
    epochs: int = 8  # passes over the training images
    lr: float = 0.001  # Adam's step
    batch_size: int = 64  # images per step
    dropout: float = 0.5  # before the last layer
    flip: bool = True  # flip training images left to right at random
    seed: int = 0  # seed of the images drawn, the weights and the shuffling
    data_dir: str = ""  # where the Fashion-MNIST files are (default: the usual places)


class Net(nn.Module):
    """Takes float images [N, 3, 28, 28] in [0, 1]; returns logits [N, 10]."""

    def __init__(self, dropout: float = 0.5, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7x7
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 512),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(512, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features((x - 0.5) / 0.5))


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28, 3] -> float32 [N, 3, 28, 28] in [0, 1], as a worker decodes a PNG."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


class Batches:
    """Training images kept as uint8; a batch is converted (and flipped at random) when taken."""

    def __init__(self, ds: Images, flip: bool) -> None:
        self.images = torch.from_numpy(ds.images)
        self.labels = torch.from_numpy(ds.labels)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[idx].permute(0, 3, 1, 2).float().div_(255.0)
        if self.flip:
            mirror = torch.rand(len(idx)) < 0.5
            x[mirror] = x[mirror].flip(3)
        return x, self.labels[idx]


@torch.no_grad()
def evaluate(model: nn.Module, ds: Images, device: torch.device, batch: int = 500) -> dict[str, float]:
    model.eval()
    loss, right = 0.0, 0
    for i in range(0, len(ds), batch):
        logits = model(to_input(ds.images[i : i + batch]).to(device)).cpu()
        y = torch.from_numpy(ds.labels[i : i + batch])
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        right += int((logits.argmax(1) == y).sum())
    return {"test_loss": loss / len(ds), "test_accuracy": right / len(ds)}


def plot_predictions(model: nn.Module, ds: Images, out: Path, count: int = 24) -> Path:
    plt = pyplot()
    with torch.no_grad():
        pred = model(to_input(ds.images[:count])).argmax(1).numpy()
    fig, axes = plt.subplots(3, count // 3, figsize=(count // 3 * 1.5, 5))
    for i, ax in enumerate(axes.flat):
        ax.imshow(ds.images[i])
        right = pred[i] == ds.labels[i]
        ax.set_title(f"{ds.classes[ds.labels[i]]}\n{ds.classes[pred[i]]}", fontsize=7, color="black" if right else "red")
        ax.axis("off")
    fig.suptitle("test images: label / prediction (red: wrong)")
    return save(fig, out)


def publisher(model: nn.Module, name: str, test: Images, parity_images: int) -> Publisher:
    """The model served as "which class" on images a worker decodes from PNG or JPEG, checked on the
    first ``parity_images`` test images."""
    feeds = {"image": to_input(test.images[:parity_images]).numpy()}
    image = ImageSpec("image", mode="RGB", size=(28, 28), scale=1 / 255, mean=(0.0,) * 3, std=(1.0,) * 3)
    outputs = [TensorSpec("logits", "FP32", (-1, len(test.classes)))]
    labels = {"logits": list(test.classes)}
    return torch_publisher(model, name, feeds, outputs, labels, classify=True, image=image)


def train(cfg: Config, run: Run, log=print) -> Trained:  # noqa: ANN001
    trainer = begin(run, "colour-cnn", cfg, "colour-cnn")
    tr = coloured_fashion("train", cfg.train_images, cfg.seed, cfg.data_dir or None)
    te = coloured_fashion("test", cfg.test_images, cfg.seed, cfg.data_dir or None)
    model = Net(cfg.dropout, len(tr.classes))
    log(f"coloured Fashion-MNIST: {len(tr)} training, {len(te)} test images; {sum(p.numel() for p in model.parameters()):,} parameters")
    device = trainer.ctx.device
    hist = trainer.fit(model, Batches(tr, cfg.flip), F.cross_entropy, lambda m: evaluate(m, te, device), log)
    last = hist.epochs[-1]
    title = "CNN on coloured Fashion-MNIST (CIFAR-10 stand-in)"
    trainer.draw(
        {
            "curves.png": lambda p: plot_history(hist, p, title),
            "predictions.png": lambda p: plot_predictions(model, te, p),
        }
    )
    if trainer.ctx.distributed:
        trainer.device += f" x {trainer.ctx.world} workers"
    name = "colour-cnn"
    dataset = f"coloured Fashion-MNIST, {len(tr)} training / {len(te)} test images (seed {cfg.seed})"
    details = {
        "test_loss": round(last["test_loss"], 6),
        "epochs": cfg.epochs,
        "samples_per_s": round(hist.samples_per_s, 1),
    }
    sha = {"train": tr.sha256, "test": te.sha256}
    outcome = trainer.outcome(name, dataset, "test accuracy", last["test_accuracy"], details, sha)
    return Trained(outcome, publisher(model, name, te, 256))
