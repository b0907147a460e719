"""The OpenAPI 3 document of the central's HTTP API, served at ``GET /v1/openapi.json``.

Written by hand next to the routes it describes; a test checks that every route the server answers
is in it.
"""

from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERR = _json(_ref("Error"), "error")
_ERRORS = {
    "400": {**_ERR, "description": "malformed JSON or an invalid field"},
    "401": {**_ERR, "description": "missing or wrong credentials"},
    "429": {**_ERR, "description": "too many failed logins for this account or address; see Retry-After"},
    "503": {**_ERR, "description": "the database did not answer in time; try again or another replica"},
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "what is wrong, in words"}},
    },
    "ModelLoad": {
        "type": "object",
        "required": ["name", "version"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "ready": {"type": "boolean", "default": True},
            "asleep": {
                "type": "boolean",
                "default": False,
                "description": "no worker now; the cluster starts one for the first request",
            },
            "in_flight": {"type": "number", "minimum": 0},
            "capacity": {"type": "number", "minimum": 0, "default": 1},
            "queue": {"type": "number", "minimum": 0},
            "latency_ms": {"type": "number", "minimum": 0},
            "workers": {"type": "integer", "minimum": 0},
        },
    },
    "Report": {
        "type": "object",
        "required": ["address", "models"],
        "properties": {
            "address": {"type": "string", "format": "uri", "example": "http://127.0.0.1:8000"},
            "models": {"type": "array", "items": _ref("ModelLoad")},
        },
    },
    "ReportAnswer": {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "cluster": {"type": "string"},
            "token_key": {
                "type": "string",
                "description": "base64url (padded) of the 32-byte key this cluster verifies route tokens with",
            },
            "report_interval_s": {"type": "number"},
        },
    },
    "RouteRequest": {
        "type": "object",
        "required": ["model"],
        "properties": {
            "model": {"type": "string"},
            "version": {"type": "string"},
            "exclude": {"type": "array", "items": {"type": "string"}, "description": "clusters to avoid"},
        },
    },
    "Route": {
        "type": "object",
        "properties": {
            "cluster": {"type": "string"},
            "url": {"type": "string"},
            "token": {"type": "string", "description": "route token: Authorization: Bearer at the cluster"},
            "expires_at": {"type": "integer", "description": "unix seconds"},
            "model": {"type": "string"},
            "version": {"type": "string"},
        },
    },
    "Session": {
        "type": "object",
        "properties": {
            "token": {"type": "string"},
            "expires_in": {"type": "integer"},
            "kind": {"type": "string", "enum": ["device"]},
        },
    },
    "Cluster": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "address": {"type": "string"},
            "live": {"type": "boolean"},
            "last_report_s": {"type": "number"},
            "load": {"type": "number", "nullable": True},
            "models": {"type": "array", "items": _ref("ModelLoad")},
        },
    },
    "NewAccount": {
        "type": "object",
        "required": ["kind", "name", "password"],
        "properties": {
            "kind": {"type": "string", "enum": ["device", "cluster", "operator"]},
            "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"},
            "password": {"type": "string", "minLength": 8},
        },
    },
    "NewCommand": {
        "type": "object",
        "required": ["command"],
        "properties": {"command": {"type": "string"}, "args": {"type": "object"}},
    },
    "Command": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "command": {"type": "string"},
            "args": {"type": "object"},
            "created_at": {"type": "number"},
            "created_by": {"type": "string"},
        },
    },
}


def _op(
    summary: str,
    who: str | None,
    ok: dict[str, Any],
    body: str | None = None,
    errors: tuple[str, ...] = (),
    params: list[dict[str, Any]] | None = None,
    ok_status: str = "200",
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {ok_status: ok}}
    if who is not None:
        op["description"] = f"Credentials: {who}."
        op["security"] = [{"basic": []}, {"session": []}] if who.startswith("device") else [{"basic": []}]
        op["responses"]["401"] = _ERRORS["401"]
        op["responses"]["429"] = _ERRORS["429"]
        op["responses"]["503"] = _ERRORS["503"]
    else:
        op["security"] = []
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
        op["responses"]["400"] = _ERRORS["400"]
    for code in errors:
        op["responses"][code] = {**_ERR}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str, schema_type: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": schema_type}}


def openapi_document(version: str) -> dict[str, Any]:
    obj = {"type": "object"}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "shoal central",
            "version": version,
            "description": "The central directory: accounts, the live table of clusters, routes with "
            "signed route tokens, commands for devices, status.",
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "session": {"type": "http", "scheme": "bearer", "description": "from POST /v1/login"},
            },
        },
        "paths": {
            "/": {"get": _op("the status page (HTML)", "operator", {"description": "HTML page"})},
            "/metrics": {
                "get": _op("Prometheus metrics (text format)", "operator", {"description": "Prometheus text"})
            },
            "/v1/health": {"get": _op("liveness of this replica", None, _json(obj, "alive"))},
            "/v1/openapi.json": {"get": _op("this document", None, _json(obj, "OpenAPI 3"))},
            "/v1/login": {
                "post": _op("a device session token", "device (Basic)", _json(_ref("Session"), "session"))
            },
            "/v1/route": {
                "post": _op(
                    "the least-loaded live cluster serving a model, with a route token for it",
                    "device (Basic or session)",
                    _json(_ref("Route"), "route"),
                    "RouteRequest",
                    ("404",),
                )
            },
            "/v1/clusters/report": {
                "post": _op(
                    "a cluster's report (every report_interval_s); the account name is the cluster name",
                    "cluster",
                    _json(_ref("ReportAnswer"), "accepted"),
                    "Report",
                )
            },
            "/v1/clusters": {
                "get": _op(
                    "the live clusters, their models and load",
                    "operator",
                    _json(
                        {
                            "type": "object",
                            "properties": {"clusters": {"type": "array", "items": _ref("Cluster")}},
                        },
                        "clusters",
                    ),
                )
            },
            "/v1/status": {
                "get": _op(
                    "clusters, models, load, devices seen recently, counters",
                    "operator",
                    _json(obj, "status"),
                )
            },
            "/v1/accounts": {
                "get": _op(
                    "accounts (never their secrets)",
                    "operator",
                    _json(obj, "accounts"),
                    params=[{"name": "kind", "in": "query", "required": False, "schema": {"type": "string"}}],
                ),
                "post": _op(
                    "add an account", "operator", _json(obj, "added"), "NewAccount", ("409",), ok_status="201"
                ),
            },
            "/v1/accounts/{kind}/{name}": {
                "delete": _op(
                    "remove an account",
                    "operator",
                    _json(obj, "removed"),
                    errors=("404", "409"),
                    params=[_path_param("kind"), _path_param("name")],
                )
            },
            "/v1/devices/{name}/commands": {
                "post": _op(
                    "post a command for a device",
                    "operator",
                    _json(obj, "stored; {id}"),
                    "NewCommand",
                    ("404",),
                    [_path_param("name")],
                    ok_status="201",
                )
            },
            "/v1/commands": {
                "get": _op(
                    "this device's unacknowledged commands; waits up to `wait` seconds for one (long poll)",
                    "device (Basic or session)",
                    _json(
                        {
                            "type": "object",
                            "properties": {"commands": {"type": "array", "items": _ref("Command")}},
                        },
                        "commands",
                    ),
                    params=[
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "number", "maximum": 60},
                        }
                    ],
                )
            },
            "/v1/commands/{id}/ack": {
                "post": _op(
                    'acknowledge a command, optionally with {"result": ...}',
                    "device (Basic or session)",
                    _json(obj, "acknowledged"),
                    errors=("400", "404"),
                    params=[_path_param("id", "integer")],
                )
            },
        },
    }
