"""The Open Inference Protocol's JSON documents as typed structures, for the gateway's OpenAPI
document (``gateway/openapi.py``, JSON Schema from msgspec). They describe what the gateway accepts
and answers; the request path does not decode through them (``oip.py`` and ``json_tensors.py`` do,
faster and with the bounds they name), so each is written no stricter than those decoders: a body
that breaks one of these schemas is one the gateway refuses, and the OpenAPI test checks it.
Pure data.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from shoal.protocol.classification import MAX_CLASSES
from shoal.protocol.interface import DATATYPES
from shoal.protocol.names import PATTERN as NAME_PATTERN
from shoal.protocol.oip import MAX_REQUEST_ID, MAX_TENSORS
from shoal.protocol.tensors import MAX_DIMS

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]
assert set(Datatype.__args__) == set(DATATYPES)  # type: ignore[attr-defined]
Shape = Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=MAX_DIMS)]
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
# Printable ASCII (the lookahead: ``$`` alone would let a final newline through, as in names.py).
RequestId = Annotated[str, msgspec.Meta(pattern=rf"^[ -~]{{1,{MAX_REQUEST_ID}}}(?!\n)$")]


class Error(msgspec.Struct):
    error: str


class Live(msgspec.Struct):
    live: bool


class Ready(msgspec.Struct):
    ready: bool


class ServerMetadata(msgspec.Struct):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(msgspec.Struct):
    name: str
    datatype: str
    shape: list[int]  # -1: any size


class ModelMetadata(msgspec.Struct):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = {}


class ModelReady(msgspec.Struct):
    name: str
    version: str
    ready: bool


class ModelNotReady(msgspec.Struct):
    """A readiness probe's 503: the model's readiness, or an error (no such model yet)."""

    name: str = ""
    version: str = ""
    ready: bool = False
    error: str | None = None


class InferInput(msgspec.Struct):
    """An input: its elements in ``data`` (flat or nested, row-major), or with the binary tensor
    extension ``parameters.binary_data_size`` bytes after the JSON part."""

    name: Annotated[str, msgspec.Meta(min_length=1)]
    datatype: Datatype
    shape: Shape
    data: Any = None
    parameters: dict[str, Any] | None = None


class OutputParameters(msgspec.Struct):
    """``binary_data``: this output in binary after the JSON part; ``classification``: its top k
    classes as ``score:index[:label]`` strings (0: its values)."""

    classification: Annotated[int, msgspec.Meta(ge=0, le=MAX_CLASSES)] | None = None
    binary_data: Any = None


class RequestedOutput(msgspec.Struct):
    name: str
    parameters: OutputParameters | None = None


class InferRequest(msgspec.Struct):
    """``parameters``: ``binary_data_output`` (every output binary), ``timeout_ms`` (a deadline
    shorter than the gateway's)."""

    inputs: Annotated[list[InferInput], msgspec.Meta(min_length=1, max_length=MAX_TENSORS)]
    id: RequestId | None = None
    outputs: Annotated[list[RequestedOutput], msgspec.Meta(max_length=MAX_TENSORS)] | None = None
    parameters: dict[str, Any] | None = None


class InferOutput(msgspec.Struct):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None  # absent when binary (parameters.binary_data_size bytes follow)
    parameters: dict[str, Any] = {}


class InferResponse(msgspec.Struct):
    model_name: str
    model_version: str
    outputs: list[InferOutput]
    id: str | None = None
    parameters: dict[str, Any] = {}


class Duration(msgspec.Struct):
    count: int
    ns: int


class InferenceStats(msgspec.Struct):
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    cache_hit: Duration
    cache_miss: Duration


class BatchStats(msgspec.Struct):
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


class ModelStatistics(msgspec.Struct):
    name: str
    version: str
    last_inference: int  # ms since the epoch, 0: never
    inference_count: int
    execution_count: int
    inference_stats: InferenceStats
    batch_stats: list[BatchStats]
    memory_usage: list[Any]


class Statistics(msgspec.Struct):
    model_stats: list[ModelStatistics]


class ConfigTensor(msgspec.Struct):
    name: str
    data_type: str
    dims: list[int]
    label_filename: str | None = None


class ModelConfig(msgspec.Struct):
    """Triton's model configuration (``model_config.proto``'s field names); blocks shoal does not
    use are absent."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[ConfigTensor]
    output: list[ConfigTensor]
    version_policy: dict[str, Any] = {}
    parameters: dict[str, Any] = {}
    dynamic_batching: dict[str, Any] | None = None
    ensemble_scheduling: dict[str, Any] | None = None


class RepositoryIndexRequest(msgspec.Struct):
    ready: bool = False


class RepositoryModel(msgspec.Struct):
    name: str
    version: str
    state: str
    reason: str


class Empty(msgspec.Struct):
    pass


__all__ = ["NAME_PATTERN", "Name"]
