"""Request-body compression (``Content-Encoding``), bounded so a small compressed body cannot expand
into more memory than the body limit allows. Pure functions."""

from __future__ import annotations

import io
import zlib

import zstandard

ENCODINGS = ("identity", "zstd", "gzip")


class CompressionError(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def compress(body: bytes, encoding: str = "zstd", level: int = 3) -> bytes:
    if encoding == "zstd":
        return zstandard.ZstdCompressor(level=level).compress(body)
    if encoding == "gzip":
        c = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return c.compress(body) + c.flush()
    raise CompressionError(f"unsupported Content-Encoding '{encoding}'", 415)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The decoded body; 413 when it would exceed ``limit`` bytes, 400 when it is corrupt."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return body
    try:
        if enc == "zstd":
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as r:
                out = r.read(limit + 1)
        elif enc == "gzip":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = d.decompress(body, limit + 1)
            if not d.eof and len(out) <= limit:
                raise CompressionError("truncated gzip body")
        else:
            raise CompressionError(f"unsupported Content-Encoding '{encoding}' (use zstd or gzip)", 415)
    except (zstandard.ZstdError, zlib.error) as e:
        raise CompressionError(f"corrupt {enc} body: {e}") from None
    if len(out) > limit:
        raise CompressionError(f"decompressed body exceeds the {limit} byte limit", 413)
    return out
