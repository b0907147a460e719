"""Turn encoded images (PNG, JPEG, ...) into a model's input tensor, as the manifest's ``image`` block
says. Runs in the worker, so devices send images as they are and the cluster does the decoding.

Decoding costs time in proportion to pixels, on the worker's one inference thread, so what one request
may make the others wait is bounded before anything is decoded: every image's size is read from its
header first, and a request whose images hold more pixels in all than the model's budget
(``manifest.pixel_budget``) is refused (413) without decoding any."""

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
    """An image request that cannot be served; ``status`` is 400 for a bad image, 413 for too many pixels."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _failed(e: Exception) -> ImageError:
    # Pillow's decoders raise a zoo of exception types on hostile input (``SyntaxError`` from PNG
    # chunks, ``NotImplementedError`` from DDS pixel formats, ``TypeError`` and ``struct.error`` from
    # TIFF tags, ...): any of them is that one request's fault, never the worker's.
    return ImageError(f"not a decodable image: {type(e).__name__}: {e}"[:300])


def image_pixels(data: bytes) -> int:
    """Width times height, from the image's header alone (nothing is decoded)."""
    if not data:
        raise ImageError("empty image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception as e:  # see _failed
        raise _failed(e) from None
    if w * h > MAX_PIXELS:
        raise ImageError(f"image of {w}x{h} pixels exceeds the {MAX_PIXELS} pixel limit", 413)
    return w * h


def decode_image(data: bytes, spec: ImageSpec, budget: int | None = None) -> np.ndarray:
    """One encoded image -> float32 array [C, H, W] (NCHW) or [H, W, C] (NHWC); every failure is an
    ``ImageError``. Its size is checked from its header, before it is decoded, against the per-image
    limit and ``budget`` (a request's pixel budget, when this image is all the request holds)."""
    if not data:
        raise ImageError("empty image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"image of {w}x{h} pixels exceeds the {MAX_PIXELS} pixel limit", 413)
            if budget is not None and w * h > budget:
                raise _over_budget(1, w * h, budget)
            im = im.convert(spec.mode)
            if im.size != tuple(spec.size):
                im = im.resize(tuple(spec.size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32)
    except ImageError:
        raise
    except Exception as e:  # see _failed
        raise _failed(e) from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = arr * np.float32(spec.scale)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    arr = (arr - mean) / std
    if spec.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


def decode_images(items: np.ndarray, spec: ImageSpec, budget: int | None = None) -> np.ndarray:
    """A BYTES tensor of n encoded images -> float32 batch [n, ...]. With ``budget``, the images'
    pixels in all are checked against it from their headers before any is decoded (413 over it)."""
    if items.size == 0:
        raise ImageError("no images in the batch (the tensor is empty)")
    blobs = [bytes(b) for b in items.reshape(-1)]
    if len(blobs) == 1:  # its header is read once, as it is decoded
        return decode_image(blobs[0], spec, budget)[None]
    if budget is not None:
        total = sum(image_pixels(b) for b in blobs)
        if total > budget:
            raise _over_budget(len(blobs), total, budget)
    return np.stack([decode_image(b, spec) for b in blobs])


def _over_budget(images: int, pixels: int, budget: int) -> ImageError:
    return ImageError(
        f"the request's {images} image(s) hold {pixels} pixels in all, over this model's "
        f"{budget} pixels per request (the manifest's image.max_pixels); send fewer or smaller images",
        413,
    )
