"""Turn encoded images (PNG, JPEG, ...) into a model's input tensor, as the manifest's ``image`` block
says. Runs in the worker, so devices send images as they are and the cluster does the decoding."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from shoal.modelrepo.manifest import ImageSpec

# Refuse images that would decode to more than this many pixels (a "decompression bomb": a small
# PNG that expands to gigabytes). 40 MP covers the 3 MB HD frames of the source paper many times.
MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# A malformed file makes Pillow warn as well as fail; the failure is the request's answer, and a
# warning per hostile request would flood the worker's log.
warnings.filterwarnings("ignore", module=r"PIL\.")


class ImageError(ValueError):
    pass


def decode_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """One encoded image -> float32 array [C, H, W] (NCHW) or [H, W, C] (NHWC).

    Every failure is an ``ImageError``: Pillow's decoders raise a zoo of exception types on hostile
    input (``SyntaxError`` from PNG chunks, ``NotImplementedError`` from DDS pixel formats,
    ``TypeError`` and ``struct.error`` from TIFF tags, ...), and any of them is that one request's
    fault, never the worker's."""
    if not data:
        raise ImageError("empty image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"image of {w}x{h} pixels exceeds the {MAX_PIXELS} pixel limit")
            im = im.convert(spec.mode)
            if im.size != tuple(spec.size):
                im = im.resize(tuple(spec.size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32)
    except ImageError:
        raise
    except Exception as e:  # see the docstring: anything a decoder raises is a bad image
        raise ImageError(f"not a decodable image: {type(e).__name__}: {e}"[:300]) from None
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
    if items.size == 0:
        raise ImageError("no images in the batch (the tensor is empty)")
    return np.stack([decode_image(bytes(b), spec) for b in items.reshape(-1)])
