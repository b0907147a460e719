"""JSON tensors decoded with memory bounded by the request, not by what its text claims. Pure functions.

Decoding a whole JSON body into Python objects first costs 15 to 20 times the text: ``"a",`` (four
bytes) becomes a string object and a list slot (about 60 bytes), ``0,`` a float and a slot (32). An
outside test took a gateway from 64 MB to 1.3 GB with one 60 MB body that way. So here:

* the request's envelope (ids, names, shapes, parameters) is decoded by msgspec with every tensor's
  ``data`` left as ``msgspec.Raw``: a view of the body, validated as JSON but not built;
* the declared shapes are checked against the limit (``oip.parse_infer_request``) before any data is
  touched;
* numbers are then decoded in chunks of about ``CHUNK`` bytes of text straight into the numpy array
  the shape declares, counted as they go (more numbers than the shape holds stop the decoding at the
  chunk that overflows): at most one chunk of Python objects exists at a time;
* strings (BYTES) are built as objects, one per element, so their number is bounded first from the
  text itself (a quote count, which can only overestimate it), and each element is counted as
  ``BYTES_ELEMENT_COST`` bytes against the limit wherever a BYTES tensor is decoded.

Nested data is flattened in row-major order, as Triton's JSON reader does: ``[[1,2],[3,4]]`` and
``[1,2,3,4]`` are the same tensor of shape [2, 2].
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np

from shoal.protocol.tensors import BYTES_ELEMENT_COST

__all__ = ["BYTES_ELEMENT_COST", "JsonTensorError", "decode_envelope", "json_numbers", "json_strings"]

# Text decoded per step: about 64 Ki numbers, one or two milliseconds of work, 2 MB of Python
# floats at a time. Below it a tensor is decoded in one step.
CHUNK = 256 * 1024
# Characters JSON allows between the numbers of an array; taken out before a chunk is decoded.
_SEPARATORS = b"[] \t\r\n"


class JsonTensorError(ValueError):
    """Data that does not fit its declaration; the message names what is wrong, ``status`` the answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class InputDoc(msgspec.Struct):
    """One input of a request: checked by the caller, except ``data``, which stays raw JSON text."""

    name: Any = None
    datatype: Any = None
    shape: Any = None
    parameters: Any = None
    data: msgspec.Raw = msgspec.Raw()  # empty: absent


class OutputDoc(msgspec.Struct):
    name: Any = None
    parameters: Any = None


class RequestDoc(msgspec.Struct):
    inputs: list[InputDoc] | None = None
    id: Any = None
    outputs: list[OutputDoc] | None = None
    parameters: Any = None


_REQUEST = msgspec.json.Decoder(RequestDoc)


def decode_envelope(text: bytes | bytearray | memoryview) -> RequestDoc:
    """The request's structure, with tensor data left undecoded; ``JsonTensorError`` for text that is
    not a JSON object of that structure."""
    try:
        return _REQUEST.decode(text)
    except msgspec.ValidationError as e:
        raise JsonTensorError(f"the request body must be a JSON object with an 'inputs' list of objects ({e})") from None
    except msgspec.DecodeError as e:
        raise JsonTensorError(f"malformed JSON: {e}") from None


# One decoder per element kind (numpy's dtype.kind): a prebuilt decoder is three times quicker.
_ELEMENTS: dict[str, msgspec.json.Decoder[Any]] = {
    "b": msgspec.json.Decoder(list[bool]),
    "i": msgspec.json.Decoder(list[int]),
    "u": msgspec.json.Decoder(list[int]),
    "f": msgspec.json.Decoder(list[float]),
}


def _decode_numbers(text: bytes, kind: str, datatype: str, name: str) -> list[Any]:
    try:
        return _ELEMENTS[kind].decode(b"[" + text.translate(None, _SEPARATORS) + b"]")
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise JsonTensorError(f"input '{name}': data is not {datatype}: {e}") from None


def json_numbers(
    raw: msgspec.Raw | bytes, datatype: str, dtype: np.dtype, shape: tuple[int, ...], name: str
) -> np.ndarray:
    """An array of ``shape`` of numbers from a JSON array (nested or not) of numbers (or
    of ``true``/``false`` for BOOL). The array is allocated once, from the shape; the text is decoded
    in chunks cut at commas (numbers hold none), so more numbers than declared stop the decoding."""
    count = math.prod(shape)
    size = len(raw)
    if size <= CHUNK:  # the common case: one step
        values = _decode_numbers(bytes(raw), dtype.kind, datatype, name)
        if len(values) != count:
            raise JsonTensorError(
                f"input '{name}': shape {list(shape)} needs {count} elements, data has {len(values)}"
            )
        return _fill(np.empty(shape, dtype), values, datatype, name)
    out = np.empty(count, dtype)
    mv = memoryview(raw)
    n = 0
    carry = b""
    for start in range(0, size, CHUNK):
        piece = carry + bytes(mv[start : start + CHUNK])
        if start + CHUNK < size:
            cut = piece.rfind(b",")
            if cut < 0:
                if len(piece) > 4 * CHUNK:
                    raise JsonTensorError(f"input '{name}': a number of more than {4 * CHUNK} characters")
                carry = piece
                continue
            piece, carry = piece[:cut], piece[cut + 1 :]
        values = _decode_numbers(piece, dtype.kind, datatype, name)
        k = len(values)
        if n + k > count:
            raise JsonTensorError(f"input '{name}': shape {list(shape)} needs {count} elements, data has more")
        _fill(out[n : n + k], values, datatype, name)
        n += k
    if n != count:
        raise JsonTensorError(f"input '{name}': shape {list(shape)} needs {count} elements, data has {n}")
    return out.reshape(shape)


def _fill(out: np.ndarray, values: list[Any], datatype: str, name: str) -> np.ndarray:
    try:  # 1e300 as FP32 becomes inf, as numpy makes it (it warns once per process, not per request)
        out.reshape(-1)[:] = values
    except (OverflowError, ValueError, TypeError) as e:
        raise JsonTensorError(f"input '{name}': data is not {datatype}: {e}") from None
    return out


def quote_count(raw: msgspec.Raw | bytes) -> int:
    """Quotes in the text, counted without copying it or building anything."""
    a = np.frombuffer(memoryview(raw), np.uint8)
    return sum(int(np.count_nonzero(a[i : i + CHUNK * 4] == 0x22)) for i in range(0, len(a), CHUNK * 4))


def json_strings(raw: msgspec.Raw | bytes, shape: tuple[int, ...], max_elements: int, name: str) -> np.ndarray:
    """An object array of ``shape`` of byte strings (UTF-8) from a JSON array (nested or not) of
    strings. How many strings the text holds is bounded from its quotes before any is built (escaped
    quotes can only make the bound larger): more than ``max_elements`` is refused (413)."""
    if quote_count(raw) > 2 * max_elements:
        raise JsonTensorError(
            f"input '{name}': its data holds more than {max_elements} strings, the most one request may send",
            413,
        )
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise JsonTensorError(f"malformed JSON: {e}") from None
    items: list[bytes] = []
    stack = [data]
    while stack:  # row-major: a list's items are pushed in reverse, so they come off in order
        x = stack.pop()
        if isinstance(x, str):
            items.append(x.encode())
        elif isinstance(x, list):
            stack.extend(reversed(x))
        else:  # bytes(5) would be five zero bytes (and bytes(10**9) a gigabyte): strings only
            raise JsonTensorError(f"input '{name}': data is not BYTES: {type(x).__name__} where a string belongs")
    count = math.prod(shape)
    if len(items) != count:
        raise JsonTensorError(f"input '{name}': shape {list(shape)} needs {count} elements, data has {len(items)}")
    arr = np.empty(count, dtype=object)
    arr[:] = items
    return arr.reshape(shape)
