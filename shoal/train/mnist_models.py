"""The three MNIST models of the paper: softmax regression, a two-hidden-layer MLP and a small CNN.

All take ``image`` float32 ``[N, 1, 28, 28]`` (normalised as in :data:`MEAN` / :data:`STD`) and return
``logits`` ``[N, 10]``; softmax is left to the loss and to whoever reads the output, so the exported
graph stays a plain classifier.
"""

from __future__ import annotations

import torch
from torch import nn

ARCHS = ("softmax", "mlp", "cnn")

# MNIST pixel statistics after scaling to [0, 1]; the manifest's image block repeats them so a worker
# turns a raw PNG/JPEG into the same input as training saw.
MEAN = 0.1307
STD = 0.3081


class SoftmaxRegression(nn.Module):
    """784 -> 10, one linear layer; zero-initialised as in the paper."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """784 -> 256 -> 256 -> 10; sigmoid hidden units as in the paper, ReLU on request."""

    def __init__(self, hidden: int = 256, activation: str = "sigmoid", num_classes: int = 10) -> None:
        super().__init__()
        act: type[nn.Module] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}[activation]
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, hidden),
            act(),
            nn.Linear(hidden, hidden),
            act(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """conv 5x5x32 (same) -> ReLU -> max-pool 2 -> conv 5x5x64 (same) -> ReLU -> max-pool 2
    -> fully connected 1024 -> ReLU -> dropout -> 10."""

    def __init__(self, dropout: float = 0.5, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(7 * 7 * 64, 1024),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(1024, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class UnitPixels(nn.Module):
    """Undo the input normalisation: paper 004's models see pixels in [0, 1] (TensorFlow's
    ``input_data``), while shoal's pipeline and manifest feed ``(pixel - MEAN) / STD``. As the first
    layer of a ``--recipe paper`` model it keeps the paper's training dynamics and the usual input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * STD + MEAN


def normal_init_(model: nn.Module) -> nn.Module:
    """Every weight and bias from N(0, 1), as ``tf.random_normal`` in paper 004's MLP."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 1.0)
            nn.init.normal_(m.bias, 0.0, 1.0)
    return model


def build_model(
    arch: str, activation: str = "sigmoid", dropout: float = 0.5, num_classes: int = 10, recipe: str = "shoal"
) -> nn.Module:
    if recipe == "paper":  # paper 004 as printed: [0, 1] pixels; MLP N(0, 1), softmax zeros
        if arch == "mlp":
            mlp = normal_init_(MLP(activation=activation, num_classes=num_classes))
            return nn.Sequential(UnitPixels(), mlp)
        if arch == "softmax":
            return nn.Sequential(UnitPixels(), SoftmaxRegression(num_classes))
        raise ValueError(f"the paper recipe covers softmax and mlp, not '{arch}'")
    if arch == "softmax":
        return SoftmaxRegression(num_classes)
    if arch == "mlp":
        return MLP(activation=activation, num_classes=num_classes)
    if arch == "cnn":
        return CNN(dropout=dropout, num_classes=num_classes)
    raise ValueError(f"unknown arch '{arch}' (known: {', '.join(ARCHS)})")
