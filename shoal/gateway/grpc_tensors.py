"""Tensors between the gRPC protocol's messages and shoal's: a ``ModelInferRequest`` becomes the same
``oip.InferRequest`` an HTTP body becomes (so ``oip.bind_inputs`` checks both alike), and outputs
become a ``ModelInferResponse`` with ``raw_output_contents``, as ``tritonclient.grpc`` reads them.
Pure conversions: no I/O, no clock.

Inputs come as ``raw_input_contents`` (one buffer per input, the binary extension's layout: BYTES
elements each a 4-byte little-endian length and the bytes) or as typed ``contents``. Every declared
tensor is counted against the byte limit from its shape before any array is built, as on HTTP.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import json_format

from shoal.protocol.classification import ClassificationError, class_count
from shoal.protocol.link_messages import TensorDesc
from shoal.protocol.oip import (
    MAX_REQUEST_ID,
    MAX_TENSORS,
    InferRequest,
    ProtocolError,
    RequestedOutput,
    tensor_cost,
    valid_request_id,
)
from shoal.protocol.oip_grpc import grpc_service_pb2 as pb
from shoal.protocol.oip_grpc import model_config_pb2
from shoal.protocol.tensors import (
    BYTES_ELEMENT_COST,
    NP_DTYPES,
    TensorError,
    check_shape,
    element_count,
    from_buffer,
    to_buffer,
)

# Which typed ``contents`` field holds each datatype (FP16 travels only as raw contents).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(p: pb.InferParameter) -> Any:
    """An ``InferParameter``'s value as a Python value (None when it holds none)."""
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which is not None else None


def parameters(params: Any) -> dict[str, Any]:
    return {k: parameter_value(v) for k, v in params.items()} if params else {}


def _typed(t: pb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...], max_bytes: int) -> np.ndarray:
    field = CONTENTS_FIELD.get(t.datatype)
    if field is None:
        raise ProtocolError(f"input '{t.name}': {t.datatype} travels only in raw_input_contents")
    values = getattr(t.contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise ProtocolError(
            f"input '{t.name}': shape {list(shape)} holds {count} elements but contents.{field} has {len(values)}"
        )
    if t.datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        if sum(len(v) for v in arr) > max_bytes:
            raise ProtocolError(f"input '{t.name}': more than {max_bytes} bytes", 413)
        return arr.reshape(shape)
    return np.asarray(values, dtype=NP_DTYPES[t.datatype]).reshape(shape)


def infer_request(req: pb.ModelInferRequest, max_tensor_bytes: int) -> InferRequest:
    """The request as ``oip.InferRequest`` (its inputs still to be bound to the model's)."""
    if not req.inputs:
        raise ProtocolError("request needs at least one input")
    if len(req.inputs) > MAX_TENSORS or len(req.outputs) > MAX_TENSORS:
        raise ProtocolError(f"at most {MAX_TENSORS} inputs and {MAX_TENSORS} outputs per request")
    if req.id and not valid_request_id(req.id):
        raise ProtocolError(f"'id' must be 1 to {MAX_REQUEST_ID} printable ASCII characters")
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise ProtocolError(
            f"raw_input_contents holds {len(raw)} buffers for {len(req.inputs)} inputs: give one per input"
        )
    total = 0
    declared: list[tuple[pb.ModelInferRequest.InferInputTensor, tuple[int, ...]]] = []
    for t in req.inputs:
        if t.datatype not in NP_DTYPES and t.datatype != "BYTES":
            raise ProtocolError(f"input '{t.name}': unknown datatype {t.datatype!r}")
        try:
            shape = check_shape(list(t.shape))
        except TensorError as e:
            raise ProtocolError(f"input '{t.name}': {e}") from None
        total += tensor_cost(t.datatype, shape)
        if total > max_tensor_bytes:
            raise ProtocolError(
                f"the inputs declare more than {max_tensor_bytes} bytes of tensors "
                f"(input '{t.name}' is {t.datatype} {list(shape)})",
                413,
            )
        declared.append((t, shape))
    arrays: dict[str, np.ndarray] = {}
    for i, (t, shape) in enumerate(declared):
        if t.name in arrays:
            raise ProtocolError(f"input '{t.name}' given twice")
        try:
            if raw:
                arrays[t.name] = from_buffer(
                    t.datatype, shape, raw[i], max_tensor_bytes // BYTES_ELEMENT_COST
                )
            else:
                arrays[t.name] = _typed(t, shape, max_tensor_bytes)
        except TensorError as e:
            raise ProtocolError(f"input '{t.name}': {e}", e.status) from None
    outputs = [_requested(o) for o in req.outputs] if req.outputs else None
    return InferRequest(req.id or None, arrays, outputs, parameters(req.parameters), True)


def _requested(o: pb.ModelInferRequest.InferRequestedOutputTensor) -> RequestedOutput:
    """A requested output; ``classification`` (tritonclient's ``class_count``) asks for its top k."""
    k = o.parameters.get("classification")
    try:
        return RequestedOutput(
            o.name, True, class_count(parameter_value(k) if k is not None else None, o.name)
        )
    except ClassificationError as e:
        raise ProtocolError(str(e)) from None


def _output_tensor(name: str, datatype: str, shape: Any) -> pb.ModelInferResponse.InferOutputTensor:
    return pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=shape)


def infer_response(
    model: str, version: str, rid: str, outputs: dict[str, np.ndarray]
) -> pb.ModelInferResponse:
    """Outputs as arrays, as raw contents."""
    resp = pb.ModelInferResponse(model_name=model, model_version=version, id=rid)
    for name, arr in outputs.items():
        dt, shape, buf = to_buffer(arr)
        resp.outputs.append(_output_tensor(name, dt, shape))
        resp.raw_output_contents.append(bytes(buf))
    return resp


def raw_infer_response(
    model: str, version: str, rid: str, descs: list[TensorDesc], payload: bytes | memoryview
) -> pb.ModelInferResponse:
    """A worker's result as it came (its tensor descriptions and payload) sliced into raw contents,
    never unpacked into arrays; sizes are checked as ``tensors.unpack_tensors`` checks them."""
    resp = pb.ModelInferResponse(model_name=model, model_version=version, id=rid)
    mv = memoryview(payload)
    pos = 0
    for d in descs:
        shape = check_shape(d.shape)
        if d.size < 0 or pos + d.size > len(mv):
            raise TensorError(f"tensor '{d.name}' claims {d.size} bytes beyond the payload")
        if d.datatype != "BYTES" and d.size != element_count(shape) * NP_DTYPES[d.datatype].itemsize:
            raise TensorError(f"tensor '{d.name}': {d.size} bytes do not fit {d.datatype} {list(shape)}")
        resp.outputs.append(_output_tensor(d.name, d.datatype, shape))
        resp.raw_output_contents.append(bytes(mv[pos : pos + d.size]))
        pos += d.size
    if pos != len(mv):
        raise TensorError(f"payload has {len(mv) - pos} bytes not claimed by any tensor")
    return resp


def model_metadata(doc: dict[str, Any]) -> pb.ModelMetadataResponse:
    """The HTTP model metadata document as the gRPC message."""

    def tensor(t: dict[str, Any]) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(
            name=t["name"], datatype=t["datatype"], shape=t["shape"]
        )

    return pb.ModelMetadataResponse(
        name=doc["name"],
        versions=[str(v) for v in doc.get("versions", [])],
        platform=str(doc.get("platform", "")),
        inputs=[tensor(t) for t in doc.get("inputs", [])],
        outputs=[tensor(t) for t in doc.get("outputs", [])],
    )


def model_statistics(doc: dict[str, Any]) -> pb.ModelStatisticsResponse:
    """The HTTP statistics document (``gateway/stats.py``) as the gRPC message: the same field names."""
    return json_format.ParseDict(doc, pb.ModelStatisticsResponse())


def model_config_response(doc: dict[str, Any]) -> pb.ModelConfigResponse:
    """The HTTP configuration document (``protocol/model_config.py``) as the gRPC message."""
    return pb.ModelConfigResponse(config=json_format.ParseDict(doc, model_config_pb2.ModelConfig()))
