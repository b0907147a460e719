"""The Open Inference Protocol (KServe v2) REST API as pure functions: paths and bodies in,
typed requests out; outputs in, response bodies out. No sockets here.

Covers JSON tensors, the binary tensor extension in both directions (``Inference-Header-Content-Length``,
``binary_data_size``, ``binary_data_output``) and the raw binary request (header length 0: the body is
the single input, for example a JPEG).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import numpy as np
import orjson

from shoal.protocol.classification import ClassificationError, class_count
from shoal.protocol.interface import TensorSpec
from shoal.protocol.json_tensors import (
    BYTES_ELEMENT_COST,
    InputDoc,
    JsonTensorError,
    decode_envelope,
    json_numbers,
    json_strings,
)
from shoal.protocol.link_messages import TensorDesc
from shoal.protocol.names import RULE as NAME_RULE
from shoal.protocol.names import valid_name
from shoal.protocol.tensors import (
    NP_DTYPES,
    TensorError,
    check_shape,
    datatype_of,
    decode_bytes_elements,
    element_count,
    from_buffer,
    to_buffer,
)

HEADER_LENGTH = "inference-header-content-length"
MAX_TENSORS = 64  # inputs or outputs named in one request
# A request id comes back in the X-Request-Id header and goes into logs: printable ASCII only (a CR or
# LF would split the header), and short (Triton and KServe clients send UUIDs: 36 characters).
MAX_REQUEST_ID = 256


def valid_request_id(rid: str) -> bool:
    return 0 < len(rid) <= MAX_REQUEST_ID and rid.isascii() and rid.isprintable()


class ProtocolError(ValueError):
    """A request the protocol cannot accept; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# A request's deadline and priority where its body has no parameters (a raw binary body): headers.
TIMEOUT_HEADER = b"x-request-timeout-ms"
PRIORITY_HEADER = b"x-request-priority"
MAX_PRIORITY = 1 << 16


def request_timeout_ms(params: dict[str, Any]) -> float | None:
    """The request's own deadline in milliseconds: ``timeout_ms``, or Triton's ``timeout`` in
    microseconds (what ``tritonclient``'s ``timeout`` argument sends); None when it names none."""
    t = params.get("timeout_ms")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0:
        return float(t)
    t = params.get("timeout")
    if isinstance(t, int) and not isinstance(t, bool) and t > 0:
        return t / 1000.0
    return None


def request_priority(params: dict[str, Any]) -> int:
    """Triton's ``priority`` parameter: 1 the highest level, 0 (or none) the model's default."""
    v = params.get("priority", 0)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_PRIORITY:
        raise ProtocolError(f"'priority' must be an integer from 0 to {MAX_PRIORITY} (1 is the highest)")
    return v


def header_number(raw: bytes, name: str, limit: int) -> int:
    """A header's value as a number from 0 to ``limit`` (``ProtocolError`` otherwise)."""
    if not raw.isdigit() or len(raw) > 10 or int(raw) > limit:
        raise ProtocolError(f"{name} must be an integer from 0 to {limit}")
    return int(raw)


# ---------------------------------------------------------------------------------------- paths


@dataclass(frozen=True, slots=True)
class PathRoute:
    kind: str  # live | ready | server | model | model_ready | infer | stats | config (model "": all)
    model: str = ""
    version: str | None = None


_FIXED = {
    "/v2/health/live": PathRoute("live"),
    "/v2/health/ready": PathRoute("ready"),
    "/v2": PathRoute("server"),
    "/v2/": PathRoute("server"),
}


def path_segments(path: str) -> list[str]:
    """A request path's segments, each percent-decoded exactly once. ``path`` is the path as it came
    (still encoded): splitting before decoding keeps an encoded ``/`` (``%2F``) inside its segment,
    where the name check refuses it, and decoding once means ``%252F`` stays ``%2F``, never ``/``."""
    parts = path.split("/")
    return [unquote(p) for p in parts] if "%" in path else parts


_VALID: set[str] = set()  # names already checked: a request's path is checked with one set lookup


def _name(segment: str, what: str) -> str:
    if segment in _VALID:
        return segment
    if not valid_name(segment):
        raise ProtocolError(f"invalid {what} {segment!r:.80}: must be {NAME_RULE}")
    if len(_VALID) >= 4096:  # bounded: names are few, but any client may send any valid one
        _VALID.clear()
    _VALID.add(segment)
    return segment


def parse_path(path: str) -> PathRoute | None:
    """Map a request path (as it came, percent-encoded) to a route, or None when the path is not part
    of the protocol. A model name or version that is not valid (``protocol/names.py``) is a
    ``ProtocolError`` (400), whatever it would have matched."""
    r = _FIXED.get(path)
    if r is not None:
        return r
    if not path.startswith("/v2/models/"):
        return None
    parts = path_segments(path[len("/v2/models/") :])
    if not parts[0]:
        return None
    if parts == ["stats"]:  # every model's statistics, as Triton has it (a model named "stats" loses)
        return PathRoute("stats")
    rest = parts[1:]
    version = None
    if len(rest) >= 2 and rest[0] == "versions":
        version = rest[1]
        rest = rest[2:]
    if not rest or rest == [""]:
        kind = "model"
    elif rest == ["ready"]:
        kind = "model_ready"
    elif rest == ["infer"]:
        kind = "infer"
    elif rest == ["stats"]:
        kind = "stats"
    elif rest == ["config"]:
        kind = "config"
    else:
        return None
    model = _name(parts[0], "model name")
    return PathRoute(kind, model, None if version is None else _name(version, "model version"))


def parse_repository_path(path: str) -> tuple[str, str | None] | None:
    """Triton's repository extension: ``/v2/repository/index`` -> ("index", None),
    ``/v2/repository/models/{m}/load`` (or ``unload``) -> ("load", m); None for any other path. The
    name is decoded once and checked (``ProtocolError`` 400 when invalid)."""
    if path == "/v2/repository/index":
        return "index", None
    if not path.startswith("/v2/repository/models/"):
        return None
    middle, _, action = path[len("/v2/repository/models/") :].rpartition("/")
    if action not in ("load", "unload") or not middle:
        return None
    # Everything between is the name: "a/b" (or "//tmp/x") is an invalid name, not another endpoint.
    return action, _name("/".join(path_segments(middle)), "model name")


# ------------------------------------------------------------------------------------- requests


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int | None = None  # the classification extension: its top k classes


def class_counts(requested: list[RequestedOutput] | None) -> dict[str, int]:
    """The outputs asked for as classes (the classification extension), with their k."""
    if requested is None:
        return {}
    return {o.name: o.classification for o in requested if o.classification}


@dataclass(slots=True)
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None  # None: all outputs
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output: bool = False  # default for outputs not listed: binary when the request used binary
    raw: bytes | None = None  # raw binary request: the body, to be bound to the model's single input


def _json_loads(data: bytes | memoryview) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"malformed JSON: {e}") from None


def _json_tensor(t: InputDoc, i: int) -> tuple[str, str, tuple[int, ...], dict[str, Any]]:
    name, dt = t.name, t.datatype
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"inputs[{i}].name must be a non-empty string")
    if not isinstance(dt, str) or (dt not in NP_DTYPES and dt != "BYTES"):
        raise ProtocolError(f"input '{name}': unknown datatype {dt!r}")
    try:
        shape = check_shape(t.shape)
    except TensorError as e:
        raise ProtocolError(f"input '{name}': {e}") from None
    params = t.parameters if t.parameters is not None else {}
    if not isinstance(params, dict):
        raise ProtocolError(f"input '{name}': 'parameters' must be an object")
    return name, dt, shape, params


def tensor_cost(datatype: str, shape: tuple[int, ...]) -> int:
    """What a declared tensor is counted as against a request's tensor limit: its bytes, and for
    BYTES ``BYTES_ELEMENT_COST`` per element (``json_tensors``), whose own lengths the body bounds."""
    count = element_count(shape)
    return count * (BYTES_ELEMENT_COST if datatype == "BYTES" else NP_DTYPES[datatype].itemsize)


def _array_from_json(
    name: str, dt: str, shape: tuple[int, ...], raw: Any, max_tensor_bytes: int
) -> np.ndarray:
    try:
        if dt == "BYTES":
            return json_strings(raw, shape, max_tensor_bytes // BYTES_ELEMENT_COST, name)
        return json_numbers(raw, dt, NP_DTYPES[dt], shape, name)
    except JsonTensorError as e:
        raise ProtocolError(str(e), e.status) from None


def parse_infer_request(
    body: bytes | bytearray | memoryview, header_length: int | None, max_tensor_bytes: int = 1 << 62
) -> InferRequest:
    """Parse an infer body. ``header_length`` is the Inference-Header-Content-Length header (None if
    absent: the body is all JSON; 0: the body is the raw single input). The tensors a request
    declares may hold at most ``max_tensor_bytes`` in all (``tensor_cost``), checked from their
    shapes before any is built; JSON data is then decoded in bounded chunks (``json_tensors``), so
    memory follows the body and the declared shapes, never the number of items the text holds."""
    if header_length == 0:
        if not body:
            raise ProtocolError("empty body: send the input (for example an encoded image) as the body")
        return InferRequest(None, {}, None, raw=bytes(body) if not isinstance(body, bytes) else body)
    mv = memoryview(body)
    if header_length is None:
        jpart, binpart = mv, mv[len(mv) :]
    else:
        if header_length < 0 or header_length > len(body):
            raise ProtocolError(
                f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes"
            )
        jpart, binpart = mv[:header_length], mv[header_length:]
    try:
        req = decode_envelope(jpart)
    except JsonTensorError as e:
        raise ProtocolError(str(e), e.status) from None
    inputs = req.inputs
    if not inputs:
        raise ProtocolError("request needs a non-empty 'inputs' list")
    if len(inputs) > MAX_TENSORS:
        raise ProtocolError(f"at most {MAX_TENSORS} inputs per request")
    rid = req.id
    if rid is not None and not (isinstance(rid, str) and valid_request_id(rid)):
        raise ProtocolError(f"'id' must be a string of 1 to {MAX_REQUEST_ID} printable ASCII characters")
    params = req.parameters if req.parameters is not None else {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    declared: list[tuple[str, str, tuple[int, ...], dict[str, Any], InputDoc]] = []
    total = 0
    for i, t in enumerate(inputs):
        name, dt, shape, tparams = _json_tensor(t, i)
        total += tensor_cost(dt, shape)
        if total > max_tensor_bytes:
            each = f"; a BYTES element counts as {BYTES_ELEMENT_COST} bytes" if dt == "BYTES" else ""
            raise ProtocolError(
                f"the inputs declare more than {max_tensor_bytes} bytes of tensors (input '{name}' is "
                f"{dt} {list(shape)}{each})",
                413,
            )
        declared.append((name, dt, shape, tparams, t))
    arrays: dict[str, np.ndarray] = {}
    pos = 0
    used_binary = False
    for name, dt, shape, tparams, t in declared:  # every shape checked: now the data
        if name in arrays:
            raise ProtocolError(f"input '{name}' given twice")
        size = tparams.get("binary_data_size")
        if size is not None:
            used_binary = True
            if header_length is None:
                raise ProtocolError(
                    f"input '{name}' has binary_data_size but the request has no Inference-Header-Content-Length"
                )
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or pos + size > len(binpart):
                raise ProtocolError(
                    f"input '{name}': binary_data_size {size} runs past the {len(binpart)} binary bytes"
                )
            try:
                arrays[name] = from_buffer(dt, shape, binpart[pos : pos + size])
            except TensorError as e:
                raise ProtocolError(f"input '{name}': {e}") from None
            pos += size
        else:
            if not len(t.data):
                raise ProtocolError(f"input '{name}' has neither 'data' nor binary_data_size")
            arrays[name] = _array_from_json(name, dt, shape, t.data, max_tensor_bytes)
    if pos != len(binpart):
        raise ProtocolError(
            f"{len(binpart) - pos} binary bytes after the header are not claimed by any input's binary_data_size"
        )
    outputs = None
    if req.outputs is not None:
        outs = req.outputs
        if len(outs) > MAX_TENSORS:
            raise ProtocolError(f"'outputs' must be a list of at most {MAX_TENSORS} objects")
        outputs = []
        for j, o in enumerate(outs):
            if not isinstance(o.name, str):
                raise ProtocolError(f"outputs[{j}] must be an object with a 'name'")
            op = o.parameters if o.parameters is not None else {}
            if not isinstance(op, dict):
                raise ProtocolError(f"output '{o.name}': 'parameters' must be an object")
            binary = bool(op.get("binary_data", used_binary))
            try:
                k = class_count(op.get("classification"), o.name)
            except ClassificationError as e:
                raise ProtocolError(str(e)) from None
            outputs.append(RequestedOutput(o.name, binary, k))
    binary_default = bool(params.get("binary_data_output", used_binary))
    return InferRequest(rid, arrays, outputs, params, binary_default)


def shape_matches(shape: tuple[int, ...], spec: tuple[int, ...]) -> bool:
    if len(shape) != len(spec):
        return False
    for d, s in zip(shape, spec):  # noqa: B905 (lengths checked above); a plain loop: this is per request
        if s != -1 and s != d:
            return False
    return True


def bind_inputs(
    req: InferRequest, specs: tuple[TensorSpec, ...], image_input: str | None, max_batch_size: int
) -> dict[str, np.ndarray]:
    """Check a request against a model's inputs and return the arrays to send to a worker.

    A raw binary request binds to the single input: as a BYTES image when the model decodes images
    (``image_input``), else as that input's datatype with the batch dimension inferred from the size.
    An image input also accepts BYTES tensors of encoded images (one per batch row).
    """
    by_name = {s.name: s for s in specs}
    if req.raw is not None:
        if not req.raw:
            raise ProtocolError("empty body: send the input (for example an encoded image) as the body")
        if len(specs) != 1:
            raise ProtocolError(
                f"a raw binary request needs a model with exactly one input; this one has {len(specs)}"
            )
        spec = specs[0]
        if image_input == spec.name:
            arr = np.empty(1, dtype=object)
            arr[:] = [req.raw]
            return {spec.name: arr}
        if spec.datatype == "BYTES":
            arr = np.empty(1, dtype=object)
            arr[:] = [req.raw]
            return {spec.name: arr.reshape((1,) * len(spec.shape)) if spec.shape else arr}
        # A raw body is one sample: with several variable dimensions the batch dimension is 1 and
        # the one left is inferred from the size.
        dims = list(spec.shape)
        if dims.count(-1) > 1 and dims and dims[0] == -1:
            dims[0] = 1
        item = NP_DTYPES[spec.datatype].itemsize
        row = int(np.prod([d for d in dims if d != -1])) * item
        if dims.count(-1) > 1 or row == 0 or len(req.raw) % row:
            raise ProtocolError(
                f"raw body of {len(req.raw)} bytes does not fit input '{spec.name}' "
                f"{spec.datatype} {list(spec.shape)}"
            )
        shape = tuple(len(req.raw) // row if d == -1 else d for d in dims)
        req.inputs = {spec.name: from_buffer(spec.datatype, shape, req.raw)}
    for name in req.inputs:
        if name not in by_name:
            raise ProtocolError(f"unknown input '{name}'; the model's inputs are {', '.join(by_name)}")
    missing = [n for n in by_name if n not in req.inputs]
    if missing:
        raise ProtocolError(f"missing input(s): {', '.join(missing)}")
    batch = None
    for name, arr in req.inputs.items():
        spec = by_name[name]
        if arr.size == 0:
            raise ProtocolError(f"input '{name}' is empty (shape {list(arr.shape)}): send at least one row")
        dt = "BYTES" if arr.dtype == object else None
        if name == image_input and dt == "BYTES":
            if arr.ndim != 1:
                raise ProtocolError(f"input '{name}': encoded images must be a BYTES tensor of shape [n]")
            rows = arr.shape[0]
        else:
            got = dt or datatype_of(arr)
            if got != spec.datatype:
                raise ProtocolError(f"input '{name}': datatype {got} but the model expects {spec.datatype}")
            if not shape_matches(arr.shape, spec.shape):
                raise ProtocolError(
                    f"input '{name}': shape {list(arr.shape)} does not match the model's {list(spec.shape)}"
                )
            rows = arr.shape[0] if arr.ndim else 1
        if max_batch_size > 0:
            if rows > max_batch_size:
                raise ProtocolError(
                    f"input '{name}': batch of {rows} exceeds max_batch_size {max_batch_size}"
                )
            if batch is not None and rows != batch:
                raise ProtocolError("inputs disagree on the batch size")
            batch = rows
    return req.inputs


# ------------------------------------------------------------------------------------ responses


def _binary_tensor(name: Any, datatype: str, shape: Any, size: int) -> dict[str, Any]:
    """A tensor's JSON description whose contents follow the JSON as ``size`` binary bytes."""
    return {
        "name": name,
        "datatype": datatype,
        "shape": list(shape),
        "parameters": {"binary_data_size": size},
    }


def _json_data(arr: np.ndarray) -> Any:
    """A tensor's JSON ``data``: numbers stay a numpy array, which orjson writes without making a
    Python object per element (``tolist`` costs about 30 bytes each); float32 is written as the
    shortest text that reads back to the same float32."""
    if arr.dtype == object:
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
    flat = np.ascontiguousarray(arr).reshape(-1)
    return flat if flat.dtype.isnative else flat.astype(flat.dtype.newbyteorder("="))


def encode_infer_response(
    model: str,
    version: str,
    request_id: str | None,
    outputs: dict[str, np.ndarray],
    requested: list[RequestedOutput] | None,
    binary_default: bool,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Response body and, when any output is binary, the JSON header's length (for the header
    Inference-Header-Content-Length)."""
    if requested is None:
        chosen = [(n, binary_default) for n in outputs]
    else:
        chosen = []
        for r in requested:
            if r.name not in outputs:
                raise ProtocolError(
                    f"unknown output '{r.name}'; the model's outputs are {', '.join(outputs)}"
                )
            chosen.append((r.name, r.binary))
    out_json: list[dict[str, Any]] = []
    blobs: list[bytes | memoryview] = []
    for name, binary in chosen:
        arr = outputs[name]
        if binary:
            dt, shape, buf = to_buffer(arr)
            out_json.append(_binary_tensor(name, dt, shape, len(buf)))
            blobs.append(buf)
        else:
            out_json.append(
                {
                    "name": name,
                    "datatype": datatype_of(arr),
                    "shape": list(arr.shape),
                    "data": _json_data(arr),
                }
            )
    resp: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": out_json}
    if request_id is not None:
        resp["id"] = request_id
    if parameters:
        resp["parameters"] = parameters
    head = orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def binary_response(
    model: str, version: str, request_id: str | None, specs: list[TensorDesc], payload: bytes | memoryview
) -> tuple[bytes, int]:
    """A binary response straight from a worker's result frame (tensor specs and their raw bytes, in
    order), without turning the tensors into arrays and back. Checks that the specs describe exactly
    the payload."""
    outs = []
    total = 0
    for sp in specs:
        size, dt, shape = sp.size, sp.datatype, check_shape(sp.shape)
        if size < 0:
            raise TensorError(f"result tensor '{sp.name}' has a negative size")
        if dt != "BYTES":
            item = NP_DTYPES.get(dt)
            if item is None or element_count(shape) * item.itemsize != size:
                raise TensorError(f"result tensor '{sp.name}' {dt} {list(shape)} does not have {size} bytes")
        total += size
        outs.append(_binary_tensor(sp.name, dt, shape, size))
    if total != len(payload):
        raise TensorError(f"result specs claim {total} bytes, the payload has {len(payload)}")
    resp: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outs}
    if request_id is not None:
        resp["id"] = request_id
    head = orjson.dumps(resp)
    return head + bytes(payload), len(head)


def parse_infer_response(
    body: bytes, header_length: int | None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Client side: the response's JSON and its outputs as arrays (JSON or binary)."""
    mv = memoryview(body)
    hl = len(body) if header_length is None else header_length
    if hl < 0 or hl > len(body):
        raise ProtocolError(f"header length {hl} outside the body of {len(body)} bytes")
    resp = _json_loads(mv[:hl])
    if not isinstance(resp, dict) or not isinstance(resp.get("outputs"), list):
        raise ProtocolError("response has no 'outputs' list")
    pos = hl
    arrays: dict[str, np.ndarray] = {}
    for o in resp["outputs"]:
        shape = check_shape(o.get("shape"))
        dt = o.get("datatype")
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or pos + size > len(body):
                raise ProtocolError(f"output '{o.get('name')}' binary_data_size runs past the body")
            arrays[o["name"]] = from_buffer(dt, shape, mv[pos : pos + size])
            pos += size
        elif dt == "BYTES":
            arrays[o["name"]] = np.asarray(o.get("data", []), dtype=object).reshape(shape)
        else:
            arrays[o["name"]] = np.asarray(o.get("data", []), dtype=NP_DTYPES[dt]).reshape(shape)
    return resp, arrays


def build_infer_request(
    inputs: dict[str, np.ndarray],
    binary: bool = True,
    binary_output: bool = True,
    request_id: str | None = None,
    outputs: list[str] | None = None,
) -> tuple[bytes, int | None]:
    """Client side: an infer body (and header length when binary) for the given arrays."""
    ins: list[dict[str, Any]] = []
    blobs: list[bytes | memoryview] = []
    for name, arr in inputs.items():
        dt, shape, buf = to_buffer(np.asarray(arr) if not isinstance(arr, np.ndarray) else arr)
        if binary:
            ins.append(_binary_tensor(name, dt, shape, len(buf)))
            blobs.append(buf)
        else:
            ins.append({"name": name, "datatype": dt, "shape": list(shape), "data": _json_data(arr)})
    req: dict[str, Any] = {"inputs": ins, "parameters": {"binary_data_output": binary_output}}
    if request_id is not None:
        req["id"] = request_id
    if outputs is not None:
        req["outputs"] = [{"name": n, "parameters": {"binary_data": binary_output}} for n in outputs]
    head = orjson.dumps(req, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return head, None
    return b"".join([head, *blobs]), len(head)


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


__all__ = [
    "HEADER_LENGTH",
    "InferRequest",
    "ProtocolError",
    "RequestedOutput",
    "PathRoute",
    "bind_inputs",
    "binary_response",
    "build_infer_request",
    "class_counts",
    "decode_bytes_elements",
    "encode_infer_response",
    "error_body",
    "parse_infer_request",
    "parse_infer_response",
    "parse_path",
    "parse_repository_path",
    "path_segments",
]
