"""A model's interface as every part of shoal sees it, declared once: the Open Inference Protocol's
datatypes, and a tensor as a model declares it (name, datatype, shape with ``-1`` for any size). The
model repository's manifest holds these, a worker's HELLO carries them, the gateway checks requests
against them. Pure data.
"""

from __future__ import annotations

from typing import Any

import msgspec

# Open Inference Protocol datatypes and their numpy spelling (BYTES is a list of byte strings).
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "object",
}


class TensorSpec(msgspec.Struct, frozen=True):
    """A model's input or output: its name, datatype and shape (``-1`` for any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
