"""The gateway's HTTP API to stored results (``shoal cluster --store-results``), a Starlette
application the gateway's raw ASGI app hands ``/v2/results...`` to once it has authenticated the
caller and checked the role may read results (``results_action``).

``GET /v2/results`` lists them (filters: model, version, since, until, status, request_id; newest
first, ``limit`` at most 1000, paging with ``before`` = the last ``id`` seen), ``GET
/v2/results/{request_id}`` answers one with its outputs as JSON, and ``.../inputs/{name}`` and
``.../outputs/{name}`` answer a stored file's bytes. An operator reads every result; a device only
those of its own requests, and is told any other does not exist, so ids cannot be probed. Not on the
inference hot path.

Also the gateway's two hooks into the store: ``open_store`` at start and ``record_request`` after
each answered inference request.
"""

from __future__ import annotations

import functools
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shoal.protocol.oip import error_body

if TYPE_CHECKING:
    import numpy as np

    from shoal.gateway.auth import Principal
    from shoal.gateway.storage import ResultStore
    from shoal.protocol.interface import ModelInterface

PREFIX = "/v2/results"
_TYPES = {
    ".npy": "application/octet-stream",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
}


class BadQuery(ValueError):
    pass


class ListQuery(msgspec.Struct, forbid_unknown_fields=True):
    """The query of ``GET /v2/results``; times are unix seconds or ISO 8601 (UTC unless they say)."""

    model: str | None = None
    version: str | None = None
    since: str | None = None
    until: str | None = None
    status: int | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    before: int | None = None
    request_id: str | None = None

    def store_args(self) -> dict[str, Any]:
        args = {k: getattr(self, k) for k in ("model", "version", "status", "limit", "request_id")}
        args["before_id"] = self.before
        args["since"] = parse_time(self.since, "since") if self.since is not None else None
        args["until"] = parse_time(self.until, "until") if self.until is not None else None
        return args


def results_action(path: str) -> str | None:
    """The action (``gateway.auth.ACTIONS``) reading ``path`` needs, or None when it is not a results
    path: listing is "results" (operators), one result and its files "result" (the device too)."""
    if path == PREFIX or path == PREFIX + "/":
        return "results"
    if path.startswith(PREFIX + "/"):
        return "result"
    return None


async def serve_results(
    store: ResultStore | None, who: Principal, scope: dict[str, Any], receive: Any, send: Any
) -> None:
    """Answer a results request whose caller ``who`` is already allowed its action."""
    if store is None:
        body = error_body("result storage is off on this cluster (start it with --store-results DB_URL)")
        await _json(404, body)(scope, receive, send)
        return
    state = {**scope.get("state", {}), "principal": who, "store": store}
    await _app()({**scope, "state": state}, receive, send)


# ----------------------------------------------------------------------------------- endpoints


def _json(status: int, body: bytes) -> Response:
    return Response(body, status, media_type="application/json")


def _not_found(message: str) -> Response:
    return _json(404, error_body(message))


def _owner(request: Request) -> str | None:
    who: Principal = request.state.principal
    return None if who.role == "operator" else who.who


async def list_results(request: Request) -> Response:
    try:
        query = msgspec.convert(dict(request.query_params), ListQuery, strict=False)
        args = query.store_args()
    except msgspec.ValidationError as e:
        raise BadQuery(f"invalid query: {e}") from None
    return _json(200, msgspec.json.encode(await request.state.store.list(**args)))


async def get_result(request: Request) -> Response:
    rid = request.path_params["request_id"]
    got = await request.state.store.get(rid)
    owner = _owner(request)
    if got is None or (owner is not None and got.get("client") != owner):
        return _not_found(f"no stored result with request id '{rid}'")
    return _json(200, msgspec.json.encode(got))


async def get_file(request: Request) -> Response:
    rid, kinds, name = (request.path_params[k] for k in ("request_id", "kind", "name"))
    if kinds not in ("inputs", "outputs"):
        return _not_found(f"no such endpoint: GET {request.url.path}")
    kind = kinds[:-1]
    found = await request.state.store.payload_file(rid, kind, name, _owner(request))
    if found is None:
        return _not_found(f"request '{rid}' has no stored {kind} '{name}' (see /v2/results/{rid})")
    fname, data = found
    headers = {"content-disposition": f'attachment; filename="{fname}"'}
    return Response(data, 200, headers, _TYPES.get(fname[fname.rfind(".") :], "application/octet-stream"))


def _guarded(endpoint: Any) -> Any:
    """Bad queries are 400; a database or folder that fails is 503 (counted), never a crash."""

    @functools.wraps(endpoint)
    async def run(request: Request) -> Response:
        try:
            return await endpoint(request)
        except BadQuery as e:
            return _json(400, error_body(str(e)))
        except Exception as e:
            request.state.store.count_error("cannot read stored results", e)
            return _json(503, error_body(f"result storage unavailable: {type(e).__name__}"))

    return run


async def _routing_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if exc.status_code == 405:
        return _json(405, error_body(f"{path} takes GET"))
    return _json(exc.status_code, error_body(f"no such endpoint: {request.method} {path}"))


@functools.cache
def _app() -> Starlette:
    routes = [
        Route(PREFIX, _guarded(list_results), methods=["GET"]),
        Route(PREFIX + "/", _guarded(list_results), methods=["GET"]),
        Route(PREFIX + "/{request_id}", _guarded(get_result), methods=["GET"]),
        Route(PREFIX + "/{request_id}/{kind}/{name}", _guarded(get_file), methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _routing_error})
    app.router.redirect_slashes = False  # an unknown path is 404, not a redirect
    return app


def parse_time(value: str, what: str = "time") -> float:
    """Unix seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadQuery(
            f"'{what}' must be unix seconds or an ISO 8601 time such as 2026-11-25T14:00:00Z, got {value!r}"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


# ---------------------------------------------------------------------------- the gateway's hooks


def record_request(
    store: ResultStore,
    rid: str,
    spec: ModelInterface,
    inputs: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray] | None,
    status: int,
    t0: float,
    who: str,
    error: str | None = None,
) -> None:
    """Hand one answered inference request to the store (called by the HTTP app only when it is on)."""
    store.record(
        rid,
        spec.name,
        spec.version,
        inputs,
        None,
        outputs,
        status,
        (time.monotonic() - t0) * 1000.0,
        error,
        who,
    )


def open_store(
    db: str | None, folder: str, max_age_s: float | None, max_bytes: int | None, cluster: str
) -> ResultStore | None:
    """The gateway's result store (metadata in ``db``, tensors as files in ``folder``), or None when
    storage is off. Imports the database layer only when it is on; a URL it cannot use is a
    ValueError, as for any other bad setting."""
    if not db:
        return None
    try:
        from shoal.gateway.storage import ResultStore
    except ImportError as e:
        raise ValueError(
            f"result storage needs SQLAlchemy and a database driver: pip install 'shoal[storage]' ({e})"
        ) from None
    return ResultStore(db, Path(folder), max_age_s, max_bytes, cluster=cluster)
