"""A model's interface as every part of shoal sees it, declared once: the Open Inference Protocol's
datatypes, a tensor as a model declares it (name, datatype, shape with ``-1`` for any size), and a
model version's interface (``ModelInterface``: what every worker of it must agree on). The model
repository's manifest gives it (``Manifest.interface``), a worker's HELLO carries it
(``Hello.interface``), the gateway's pools check requests against it. Pure data.
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


class ModelInterface(msgspec.Struct, frozen=True):
    """What every worker of one model version must agree on, and what devices are told of it."""

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    image_input: str | None = None  # the input a raw image is decoded into, by the worker
    labels: dict[str, list[str]] = {}
    runtime: str = ""
    batch_delay_ms: float = 0.0

    def same_interface(self, other: ModelInterface) -> bool:
        return (self.inputs, self.outputs, self.max_batch_size, self.image_input) == (
            other.inputs,
            other.outputs,
            other.max_batch_size,
            other.image_input,
        )

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        """The Open Inference Protocol's model metadata."""
        return {
            "name": self.name,
            "versions": versions,
            "platform": self.runtime,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "parameters": {"max_batch_size": self.max_batch_size, "labels": self.labels},
        }
