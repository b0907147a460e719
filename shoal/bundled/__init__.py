"""Models shipped inside the package, so ``shoal demo`` serves at once on a fresh machine, without torch.

``models/`` is a model repository (``<model>/<version>/manifest.json`` + model file). Each manifest's
provenance holds the exact ``shoal train`` command that rebuilds it and the checksums of the data.
"""

from __future__ import annotations

from pathlib import Path

MODELS = Path(__file__).resolve().parent / "models"


def bundled_repo() -> Path:
    """The model repository that ships with shoal (holds ``mnist-cnn/1``)."""
    return MODELS
