"""Turn encoded images (PNG, JPEG, ...) into a model's input tensor, as the manifest's ``image`` block
says. Runs in the worker, so devices send images as they are and the cluster does the decoding."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from shoal.modelrepo.manifest import ImageSpec

# Refuse images that would decode to more than this many pixels (a "decompression bomb": a small
# PNG that expands to gigabytes). 40 MP covers the 3 MB HD frames of the source paper many times.
MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(ValueError):
    pass


def decode_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """One encoded image -> float32 array [C, H, W] (NCHW) or [H, W, C] (NHWC)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"image of {w}x{h} pixels exceeds the {MAX_PIXELS} pixel limit")
            im = im.convert(spec.mode)
            if im.size != tuple(spec.size):
                im = im.resize(tuple(spec.size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"not a decodable image: {e}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = arr * np.float32(spec.scale)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    arr = (arr - mean) / std
    if spec.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


def decode_images(items: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """A BYTES tensor of n encoded images -> float32 batch [n, ...]."""
    return np.stack([decode_image(bytes(b), spec) for b in items.reshape(-1)])
