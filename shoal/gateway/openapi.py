"""The OpenAPI 3.1 document of the gateway's HTTP API, served at ``GET /v2/openapi.json``.

The gateway's infer path is raw ASGI (no framework to read routes from), so its operations are
declared here once, as a table, with the protocol's documents as typed structures
(``protocol/oip_documents.py``, JSON Schema from msgspec); tests/test_gateway_openapi.py holds a running
gateway and its workers to the document with schemathesis, as central's is. Pure: the table and the
document are data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from shoal.gateway.auth import ACTIONS
from shoal.protocol import oip_documents as d

JSON = "application/json"
BINARY = "application/octet-stream"
REF = "#/components/schemas/{name}"

_ERRORS = {
    400: "malformed or invalid: a name, a body, a tensor that does not fit the model (the message says what)",
    401: "missing or invalid credentials",
    403: "these credentials may not do this (the message names the permission)",
    404: "no such model, version or pipeline (or the model is unloaded)",
    413: "the body, or the tensors it declares, exceed the gateway's limits",
    415: "a Content-Encoding other than zstd or gzip",
    429: "over this credential's rate limit (--quota): Retry-After and Retry-After-Ms say when to try again",
    500: "the model failed on this request",
    502: "the worker failed, or failed on every retry",
    503: (
        "not servable now: no live worker yet, the queue full, the model unavailable, or overloaded (its "
        "answer predicted after the request's deadline; see Retry-After and Retry-After-Ms)"
    ),
    504: "the request's deadline passed before a worker answered",
}
_MODEL_ERRORS = (400, 404, 503)
_INFER_ERRORS = (400, 404, 413, 415, 429, 500, 502, 503, 504)
# Request headers of inference besides the protocol's own (docs/protocol.md).
_INFER_HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-Id": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": "^[ -~]+$"},
    "X-Request-Timeout-Ms": {"type": "string", "pattern": "^[0-9]{1,10}$"},
    "X-Request-Priority": {"type": "string", "pattern": "^[0-9]{1,5}$"},
    "traceparent": {"type": "string"},
}


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    action: str | None  # what it needs of a credential (``auth.ACTIONS``); None: nothing
    answer: Any = None  # the JSON answer's type; None: ``media_type``, a string
    media_type: str = JSON
    body: Any = None  # the JSON body's type
    body_required: bool = True
    errors: tuple[int, ...] = ()
    # Statuses answered with a document other than ``{"error": ...}`` (a readiness probe's 503).
    other: dict[int, Any] = field(default_factory=dict)
    binary: bool = False  # also answers with the binary tensor extension
    query: dict[str, dict[str, Any]] = field(default_factory=dict)  # query parameters' JSON Schemas
    headers: dict[str, dict[str, Any]] = field(default_factory=dict)  # request headers' JSON Schemas


def _versioned(path: str) -> list[str]:
    """A model route and the same route for one version of the model."""
    head, _, tail = path.partition("{model}")
    return [path, f"{head}{{model}}/versions/{{version}}{tail}"]


def operations(results: bool) -> list[Operation]:
    """Every operation the gateway serves (``results``: result storage is on)."""
    ops = [
        Operation("GET", "/v2/health/live", "liveness: 200 while the process runs", None, d.Live),
        Operation(
            "GET",
            "/v2/health/ready",
            "readiness: 200 when every known model has a live worker, else 503",
            "server",
            d.Ready,
            other={503: d.Ready},
        ),
        Operation("GET", "/v2", "server metadata: name, version, the extensions served", "server", d.ServerMetadata),
        Operation(
            "GET",
            "/v2/models/stats",
            "every model's and pipeline's statistics (Triton's statistics extension)",
            "all_stats",
            d.Statistics,
        ),
    ]
    for path in _versioned("/v2/models/{model}"):
        ops.append(Operation("GET", path, "model metadata", "model", d.ModelMetadata, errors=_MODEL_ERRORS))
    for path in _versioned("/v2/models/{model}/ready"):
        ops.append(
            Operation(
                "GET",
                path,
                "model readiness: 200 when a live worker serves it, else 503",
                "model",
                d.ModelReady,
                errors=(400, 404),
                other={503: d.ModelNotReady},
            )
        )
    for path in _versioned("/v2/models/{model}/infer"):
        ops.append(
            Operation(
                "POST",
                path,
                "inference: JSON tensors, or the binary tensor extension (Inference-Header-Content-Length: "
                "the JSON part's length, binary_data_size per input, binary_data_output), or a raw body "
                "(Inference-Header-Content-Length: 0); parameters.classification on an output for its top k",
                "infer",
                d.InferResponse,
                body=d.InferRequest,
                errors=_INFER_ERRORS,
                binary=True,
                headers=_INFER_HEADERS,
            )
        )
    for path in _versioned("/v2/models/{model}/stats"):
        ops.append(
            Operation(
                "GET", path, "the model's statistics (every version's, without one)", "model", d.Statistics,
                errors=_MODEL_ERRORS,
            )
        )
    for path in _versioned("/v2/models/{model}/config"):
        ops.append(
            Operation("GET", path, "the model's configuration, Triton's shape", "model", d.ModelConfig, errors=_MODEL_ERRORS)
        )
    ops += [
        Operation("GET", "/v2/status", "shoal's own: models, workers and their load, pipelines, departed workers",
                  "status", dict[str, Any]),
        Operation("GET", "/metrics", "Prometheus metrics (text format)", "metrics", media_type="text/plain"),
        Operation("GET", "/v2/openapi.json", "this document (OpenAPI 3.1)", "server", dict[str, Any]),
        Operation(
            "POST",
            "/v2/repository/index",
            "the model repository: every model version, its state and why (operators)",
            "repository",
            list[d.RepositoryModel],
            body=d.RepositoryIndexRequest,
            body_required=False,
            errors=(400,),
        ),
    ]
    for action in ("load", "unload"):
        ops.append(
            Operation(
                "POST",
                f"/v2/repository/models/{{model}}/{action}",
                f"{action} a model: its workers {'started' if action == 'load' else 'drained'} by the engine",
                "repository",
                d.Empty,
                body=dict[str, Any],
                body_required=False,
                errors=(400, 404, 503),
            )
        )
    if results:
        ops += [
            Operation("GET", "/v2/results", "stored requests, newest first (--store-results)", "results",
                      list[dict[str, Any]], errors=(400,), query=_RESULTS_QUERY),
            Operation("GET", "/v2/results/{id}", "one stored request", "result", dict[str, Any], errors=(404,)),
            Operation("GET", "/v2/results/{id}/inputs/{name}", "a stored input (.npy, or the raw image)", "result",
                      media_type=BINARY, errors=(404,)),
            Operation("GET", "/v2/results/{id}/outputs/{name}", "a stored output (.npy)", "result",
                      media_type=BINARY, errors=(404,)),
        ]
    return ops


_TIME = {"type": "string", "description": "unix seconds or ISO 8601 (UTC unless it says)"}
_RESULTS_QUERY: dict[str, dict[str, Any]] = {
    "model": {"type": "string"},
    "version": {"type": "string"},
    "since": _TIME,
    "until": _TIME,
    # "null" (the text) reads as absent, as the gateway reads it.
    "status": {"type": ["integer", "null"], "description": "the HTTP status answered"},
    "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    "before": {"type": ["integer", "null"], "description": "the next page: results stored before this row"},
    "request_id": {"type": "string"},
}


def _path_parameters(path: str) -> list[dict[str, Any]]:
    out = []
    for name in ("model", "version"):
        if "{" + name + "}" in path:
            out.append({"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": d.NAME_PATTERN}})
    for name in ("id", "name"):
        if "{" + name + "}" in path:
            out.append({"name": name, "in": "path", "required": True, "schema": {"type": "string"}})
    return out


def _operation(op: Operation, schema: Any) -> dict[str, Any]:
    error = {JSON: {"schema": schema(d.Error)}}
    if op.answer is not None:
        content = {JSON: {"schema": schema(op.answer)}}
    else:
        content = {op.media_type: {"schema": {"type": "string"}}}
    if op.binary:
        content[BINARY] = {"schema": {"type": "string", "description": "the binary tensor extension"}}
    doc: dict[str, Any] = {
        "summary": op.summary,
        "operationId": op.method.lower() + op.path.replace("/", "_").replace("{", "").replace("}", ""),
        "responses": {"200": {"description": op.summary, "content": content}},
    }
    codes = set(op.errors)
    if op.action is not None:
        what, roles = ACTIONS[op.action]
        doc["description"] = f"Credentials: {' or '.join(sorted(roles))} ({what})."
        doc["security"] = [{"bearer": []}]
        codes |= {401, 403}
    else:
        doc["security"] = []
    if op.body is not None:
        codes.add(400)
        doc["requestBody"] = {"required": op.body_required, "content": {JSON: {"schema": schema(op.body)}}}
    for code in sorted(codes - set(op.other)):
        doc["responses"][str(code)] = {"description": _ERRORS[code], "content": error}
    for code, typ in op.other.items():
        doc["responses"][str(code)] = {"description": _ERRORS.get(code, ""), "content": {JSON: {"schema": schema(typ)}}}
    params = _path_parameters(op.path)
    params += [{"name": n, "in": "query", "required": False, "schema": sch} for n, sch in op.query.items()]
    params += [{"name": n, "in": "header", "required": False, "schema": sch} for n, sch in op.headers.items()]
    if params:
        doc["parameters"] = params
    return doc


def openapi_document(version: str, results: bool = False) -> dict[str, Any]:
    """The document for a gateway of this ``version`` (``results``: result storage is on)."""
    ops = operations(results)
    types: list[Any] = [d.Error]
    for op in ops:
        types += [t for t in (op.answer, op.body, *op.other.values()) if t is not None]
    types = list(dict.fromkeys(types))
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    ref = dict(zip(types, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, ref.__getitem__)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "shoal cluster gateway",
            "version": version,
            "description": "The Open Inference Protocol (KServe v2) over HTTP, with Triton's binary tensor, "
            "classification, statistics, model configuration and model repository extensions, and "
            "shoal's status. gRPC: the same protocol's GRPCInferenceService on its own port.",
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": paths,
    }


def endpoint_list(results: bool = False) -> set[tuple[str, str]]:
    return {(op.method, op.path) for op in operations(results)}
