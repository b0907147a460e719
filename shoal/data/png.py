"""An image array as the PNG bytes a device would send (Pillow, imported when used)."""

from __future__ import annotations

import io

import numpy as np


def to_png(image: np.ndarray) -> bytes:
    """One uint8 image, [H, W] greyscale or [H, W, 3] RGB, as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
