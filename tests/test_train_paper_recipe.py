"""Paper 004's MNIST recipe as printed (``shoal train mnist --recipe paper``): its settings, its initial
weights and its input in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shoal.train.mnist import PAPER_VALIDATION, TrainConfig, to_tensor  # noqa: E402
from shoal.train.mnist_models import build_model  # noqa: E402


def test_recipe_settings() -> None:
    mlp = TrainConfig(arch="mlp", recipe="paper").resolved()
    assert (mlp.optimizer, mlp.lr, mlp.batch_size, mlp.target_train_acc) == ("sgd", 0.01, 100, 0.95)
    assert mlp.activation == "sigmoid" and "--recipe paper" in mlp.command()
    soft = TrainConfig(arch="softmax", recipe="paper", lr=0.5).resolved()
    assert (soft.optimizer, soft.lr, soft.epochs) == ("sgd", 0.5, 500)  # explicit flags still win
    assert PAPER_VALIDATION == 5000  # 60,000 - 5,000 = TensorFlow's 55,000 training images
    with pytest.raises(ValueError, match="softmax and mlp"):
        TrainConfig(arch="cnn", recipe="paper").resolved()


def test_paper_models_see_unit_pixels_and_start_as_printed() -> None:
    torch.manual_seed(0)
    mlp = build_model("mlp", recipe="paper")
    w = torch.cat([m.weight.detach().flatten() for m in mlp.modules() if isinstance(m, torch.nn.Linear)])
    b = torch.cat([m.bias.detach().flatten() for m in mlp.modules() if isinstance(m, torch.nn.Linear)])
    assert abs(float(w.std()) - 1.0) < 0.01 and abs(float(b.std()) - 1.0) < 0.1  # N(0, 1), biases too
    soft = build_model("softmax", recipe="paper")
    assert all(float(p.detach().abs().max()) == 0.0 for p in soft.parameters())  # zero-initialised
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    unit = mlp[0](to_tensor(images))  # the pipeline's normalised input, back to pixels / 255
    np.testing.assert_allclose(unit.numpy()[:, 0], images / 255.0, atol=1e-6)
