"""The OpenAPI 3.1 document of central's HTTP API, served at ``GET /v1/openapi.json``.

Generated from the route table (``routes.route_table``) and the message types it names (JSON Schema
from msgspec), so it cannot drift from what the server does; tests/test_central_openapi.py checks the
served document against a running central with schemathesis.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shoal.central.app import JSON, Operation, RouteTable
from shoal.protocol.central_messages import Error

REF = "#/components/schemas/{name}"

# Statuses any operation of a kind may answer, besides its own.
_AUTH_ERRORS = {
    "401": "missing or wrong credentials",
    "429": "too many failed logins for this account or address; see Retry-After",
    "503": "the database did not answer in time (try again, or another replica)",
}
_INPUT_ERRORS = {
    "400": "malformed JSON, or an invalid field, parameter or query value (the message names it)",
}
_BODY_ERRORS = {"413": "body over the size limit"}
_OWN_ERRORS = {
    404: "not found (the message says what)",
    409: "conflict (the message says what)",
    503: "try again shortly (see Retry-After)",
}


def _schema_of(typ: Any) -> dict[str, Any]:
    return msgspec.json.schema(typ)


def _content(media_type: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {media_type: {"schema": schema}}


def _operation(op: Operation, ref: dict[type, dict[str, Any]]) -> dict[str, Any]:
    error = {"content": _content(JSON, ref[Error])}
    if op.answer is not None:
        ok: dict[str, Any] = {"description": op.summary, "content": _content(JSON, ref[op.answer])}
    elif op.media_type == JSON:
        ok = {"description": op.summary, "content": _content(JSON, {"type": "object"})}
    else:
        ok = {"description": op.summary, "content": _content(op.media_type, {"type": "string"})}
    doc: dict[str, Any] = {
        "summary": op.summary,
        "operationId": f"{op.method.lower()}{op.path.replace('/', '_').replace('{', '').replace('}', '')}",
        "responses": {str(op.status): ok},
    }
    errors: dict[str, str] = {}
    if op.credentials is not None:
        doc["description"] = f"Credentials: {op.credentials.describe()}."
        doc["security"] = [{"basic": []}, {"session": []}] if op.credentials.session else [{"basic": []}]
        errors.update(_AUTH_ERRORS)
    else:
        doc["security"] = []
    if op.body is not None or op.params or op.query:
        errors.update(_INPUT_ERRORS)
    if op.body is not None:
        errors.update(_BODY_ERRORS)
        doc["requestBody"] = {"required": not op.body_optional, "content": _content(JSON, ref[op.body])}
    for code in op.errors:
        errors.setdefault(str(code), _OWN_ERRORS[code])
    for code, description in sorted(errors.items()):
        doc["responses"][code] = {"description": description, **error}
    params = [
        {"name": n, "in": "path", "required": True, "schema": _schema_of(t)} for n, t in op.params.items()
    ]
    params += [{"name": n, "in": "query", "required": False, "schema": _schema_of(t)} for n, t in op.query.items()]
    params += [
        {"name": n, "in": "header", "required": False, "description": d, "schema": schema}
        for n, (schema, d) in op.headers.items()
    ]
    if params:
        doc["parameters"] = params
    return doc


def openapi_document(table: RouteTable, version: str) -> dict[str, Any]:
    types = [Error] + [t for op in table for t in (op.body, op.answer) if t is not None]
    types = list(dict.fromkeys(types))
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    ref = dict(zip(types, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in table:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, ref)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "shoal central",
            "version": version,
            "description": "The central directory: accounts, the live table of clusters, routes with "
            "signed route tokens, commands for devices, status.",
        },
        "components": {
            "schemas": components,
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "session": {"type": "http", "scheme": "bearer", "description": "from POST /v1/login"},
            },
        },
        "paths": paths,
    }
