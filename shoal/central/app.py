"""Central's HTTP application on Starlette: the route table as an object, and how a request becomes a
typed call and its answer a response.

Each ``Operation`` declares its method and path, who may call it, the types of its body, query and
path parameters and of its answer. From that one declaration the application reads the body (up to
``max_body_size``), checks the credentials, decodes and validates everything (400 naming the field),
calls the handler and encodes its answer; ``openapi.py`` writes the same declarations down as the
OpenAPI document. Errors are ``{"error": ...}`` with the status they call for: a database that does
not answer is 503, anything unforeseen 500 (and a log line), never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from shoal.central.auth import COOKIE_HEADER
from shoal.central.errors import HttpError
from shoal.protocol.central_messages import Error

if TYPE_CHECKING:
    from shoal.central.auth import Authenticator
    from shoal.central.tracing import Tracing

log = logging.getLogger("shoal.central")

JSON = "application/json"
# Every answer: never cached (it holds live state or operator data), never framed by another site,
# its type never guessed by a browser.
SECURITY_HEADERS = {"cache-control": "no-store", "x-content-type-options": "nosniff", "x-frame-options": "DENY"}
# The database is down, unreachable or did not answer in time: clients retry or use another replica.
DATABASE_ERRORS = (DBAPIError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class Credentials:
    """Who may call an operation: an account kind, and for devices whether a session token will do."""

    kind: str
    session: bool = False

    def describe(self) -> str:
        return f"{self.kind} (Basic{' or session' if self.session else ''})"


@dataclass
class Call:
    """What a handler gets: the request, the account behind it, and its decoded parts."""

    request: Request
    who: str
    body: Any
    params: dict[str, Any]
    query: dict[str, Any]
    span: Any = None  # the call's trace span, when central traces the operation (``tracing.py``)


# A handler gets the parts the application was built with (``parts.CentralParts``) and the call.
Handler = Callable[[Any, Call], Awaitable[Any]]


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    handler: Handler
    credentials: Credentials | None  # None: public
    body: type | None = None  # a msgspec Struct the body decodes into
    body_optional: bool = False
    answer: Any = None  # the type of a JSON answer; None: the handler returns a Response
    media_type: str = JSON
    status: int = 200
    errors: tuple[int, ...] = ()  # statuses besides the ones every operation of its kind may give
    params: Mapping[str, Any] = field(default_factory=dict)  # path parameter -> type
    query: Mapping[str, Any] = field(default_factory=dict)  # query parameter -> type (all optional)
    # Request headers it reads besides credentials: name -> (JSON Schema, description), all optional.
    headers: Mapping[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    # Traced when central traces (--trace-endpoint): a span per call named this, continuing the
    # caller's W3C traceparent; the handler finds it in ``Call.span``. None: never traced.
    span: str | None = None

    def __post_init__(self) -> None:
        for name in self.params:
            if "{" + name + "}" not in self.path:
                raise ValueError(f"{self.method} {self.path}: no path parameter {name!r}")


class RouteTable:
    """Every operation central serves, in one object: the application and the document read it."""

    def __init__(self, operations: list[Operation]) -> None:
        seen = set()
        for op in operations:
            if (op.method, op.path) in seen:
                raise ValueError(f"{op.method} {op.path} declared twice")
            seen.add((op.method, op.path))
        self.operations = list(operations)

    def __iter__(self) -> Iterator[Operation]:
        return iter(self.operations)

    def endpoints(self) -> list[tuple[str, str]]:
        return [(op.method, op.path) for op in self.operations]


# ------------------------------------------------------------------------------------ responses


def respond(content: bytes, status: int = 200, media_type: str = JSON, headers: Mapping[str, str] = {}) -> Response:
    return Response(content, status, {**SECURITY_HEADERS, **headers}, media_type)


_error_encoder = msgspec.json.Encoder()


def error(status: int, message: str, headers: Mapping[str, str] = {}) -> Response:
    return respond(_error_encoder.encode(Error(message)), status, headers=headers)


# --------------------------------------------------------------------------------------- inputs


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing more than ``limit`` bytes (413) however it is sent."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise HttpError(400, "bad Content-Length") from None
        if too_big:
            raise HttpError(413, f"body exceeds the {limit} byte limit")
    # ASGI messages read here rather than through Request.stream(), an async generator per request.
    parts = []
    size = 0
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            raise HttpError(499, "client went away")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"body exceeds the {limit} byte limit")
        if not msg.get("more_body"):
            return b"".join(parts) + chunk if parts else chunk
        parts.append(chunk)


def _decode_error(e: msgspec.MsgspecError) -> HttpError:
    text = str(e)
    if not isinstance(e, msgspec.ValidationError):  # (a ValidationError is a DecodeError too)
        return HttpError(400, f"malformed JSON body: {text}")
    if " - at `$" not in text and text.startswith("Expected `object`"):
        return HttpError(400, "malformed JSON body: expected a JSON object")
    return HttpError(400, f"invalid body: {text}")


def decode_body(decoder: msgspec.json.Decoder | None, body: bytes, optional: bool) -> Any:
    """The body as the operation's type. Operations without a body still refuse one that is not a
    JSON object, so every route answers malformed input alike."""
    if not body.strip():
        if decoder is None:
            return None
        if optional:
            return decoder.decode(b"{}")  # every field at its default
        raise HttpError(400, "malformed JSON body: the body is empty (send a JSON object)")
    try:
        return (decoder or _any_object).decode(body)
    except msgspec.MsgspecError as e:
        raise _decode_error(e) from None


_any_object = msgspec.json.Decoder(dict[str, Any])


def convert(values: Mapping[str, str], types: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(values) - set(types))
    if unknown:
        known = ", ".join(types) or "none"
        raise HttpError(400, f"unknown {where}(s) {', '.join(map(repr, unknown))}; known: {known}")
    out = {}
    for name, typ in types.items():
        if name not in values:
            continue
        try:
            out[name] = msgspec.convert(values[name], typ, strict=False)
        except msgspec.ValidationError as e:
            raise HttpError(400, f"{where} '{name}': {str(e).split(' - at ')[0]}") from None
    return out


# ---------------------------------------------------------------------------------- application


def _endpoint(
    parts: Any, auth: Authenticator, limit: int, op: Operation, tracing: Tracing | None = None
) -> Callable[[Request], Awaitable[Response]]:
    decoder = msgspec.json.Decoder(op.body) if op.body is not None else None
    encoder = msgspec.json.Encoder()

    async def endpoint(request: Request, span: Any = None) -> Response:
        cookie = None
        try:
            body = await read_body(request, limit)
            who = ""
            if op.credentials is not None:
                client = request.client
                who, cookie = await auth.check(
                    request.headers.get("authorization"),
                    client.host if client else "?",
                    op.credentials.kind,
                    op.credentials.session,
                    request.headers,
                )
            params = convert(request.path_params, op.params, "path parameter") if op.params else {}
            query = convert(request.query_params, op.query, "query parameter") if request.scope["query_string"] else {}
            value = decode_body(decoder, body, op.body_optional)
            answer = await op.handler(parts, Call(request, who, value, params, query, span))
            response = answer if isinstance(answer, Response) else respond(encoder.encode(answer), op.status)
        except HttpError as e:
            response = error(e.status, e.message, e.headers)
        except DATABASE_ERRORS as e:
            log.warning(
                "database error answering %s %s: %s", op.method, request.url.path, str(e).splitlines()[0][:200]
            )
            return error(503, "the central database is unreachable; try again")
        except Exception:
            log.exception("error answering %s %s", op.method, request.url.path)
            return error(500, "internal error (see the central's log)")
        if cookie is not None:  # a full password check passed: the client's proof at its next logins
            response.headers[COOKIE_HEADER] = cookie
        return response

    if tracing is None or op.span is None:
        return endpoint
    name = op.span

    async def traced(request: Request) -> Response:
        span = tracing.begin(request.headers.get("traceparent"), name)
        if span is None:  # not sampled
            return await endpoint(request)
        try:
            response = await endpoint(request, span)
        except BaseException:  # cancelled: the server is stopping, or the client went away
            tracing.end(span, 499)
            raise
        tracing.end(span, response.status_code)
        return response

    return traced


async def _routing_error(request: Request, exc: Exception) -> Response:
    """Starlette's router found no operation: 404, or 405 naming the methods the path takes."""
    assert isinstance(exc, HTTPException)
    method, path = request.method, request.url.path
    if exc.status_code == 405:
        # Starlette names the methods of one route; a path may have several (GET and POST).
        allowed: set[str] = set()
        for route in request.app.routes:
            if isinstance(route, Route) and route.matches(request.scope)[0] != Match.NONE:
                allowed |= route.methods or set()
        return error(405, f"{path} takes {' or '.join(sorted(allowed - {'HEAD'}))}, not {method}")
    if exc.status_code == 404:
        return error(404, f"no such endpoint: {method} {path}")
    return error(exc.status_code, str(exc.detail))


def build_app(
    parts: Any,
    auth: Authenticator,
    max_body_size: int,
    table: RouteTable,
    lifespan: Any,
    tracing: Tracing | None = None,
) -> Starlette:
    """The application: each operation of ``table`` checks credentials with ``auth``, decodes, and
    calls its handler with ``parts``; with ``tracing``, the operations that name a span are traced."""
    routes = [
        Route(op.path, _endpoint(parts, auth, max_body_size, op, tracing), methods=[op.method]) for op in table
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _routing_error}, lifespan=lifespan)
    app.router.redirect_slashes = False  # an unknown path is 404, not a redirect
    return app
