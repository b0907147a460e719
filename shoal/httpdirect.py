"""Requests answered without ASGI: a server's hot path on the same connections as the rest.

ASGI's machinery per request (a scope dictionary, a cycle object, ``receive`` and ``send`` coroutines
trading message dictionaries, headers checked again, a head and a body written apart) cost the
gateway about 40 µs of the 121 a request took (docs/benchmarks.md, "Where a request's microseconds
go"). A ``DirectHttpProtocol`` hands the requests its ``DirectApp`` claims (by method and URL, once
the head is in) to that app as ``DirectRequest``\\ s instead: headers as a dictionary, the body as
bytes once whole, and ``respond`` writing the status line, headers and body at once. Every other
request goes to the ASGI application as before, on the same connection. Keep-alive, pipelining (one
request at a time, answered in order), the bounds of ``BoundedHttpProtocol`` (head size, read time,
lingering close) and graceful shutdown hold for both kinds alike.

A claimed request's life:

1. Its head is in and it is its turn (the connection's earlier requests are answered): ``begin``
   (synchronous) checks what it can without the body (path, credentials, quota, load, declared
   length) and either answers at once (the body is then read and dropped, the connection kept) or
   sets ``max_body`` and ``state``.
2. Its body arrives, bounded by ``max_body``: past it, 413 and the connection closed after a bounded
   lingering read (``BoundedHttpProtocol._refuse``).
3. The body is whole: ``run`` answers it, by callback when what it waits for is one future (the
   common case: no task per request), else in a task (``start_task``). If the client goes before the
   answer, ``client_left`` is set and ``cancel`` called (a task's is its ``cancel``).
"""

from __future__ import annotations

import http
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import httptools

from shoal.httpserver import BoundedHttpProtocol, json_error_response

log = logging.getLogger("shoal.http")

_STATUS_LINE = {}
for _s in range(100, 600):
    try:
        _phrase = http.HTTPStatus(_s).phrase
    except ValueError:
        _phrase = ""
    _STATUS_LINE[_s] = f"HTTP/1.1 {_s} {_phrase}\r\n".encode()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# A response's head and a body up to this size leave in one write (one system call); a larger body
# is written after its head rather than copied into one buffer with it.
JOIN_BELOW = 64 * 1024


_rendered: list[Any] = [None, b""]  # the server's own headers (the date), and their bytes


def _server_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The server's headers as bytes: rendered again only when the server replaces them (the date,
    once a second)."""
    if headers is not _rendered[0]:
        _rendered[1] = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        _rendered[0] = headers
    return _rendered[1]


class DirectApp(Protocol):
    def claims(self, method: bytes, path: bytes) -> bool:
        """Whether this request (its method, and its URL's path as sent) is answered directly."""

    def begin(self, req: DirectRequest) -> None:
        """Its head is in: answer it now (``req.respond``), or set ``req.max_body`` and ``req.state``
        for ``run``. Must not raise."""

    def run(self, req: DirectRequest) -> None:
        """Its body is whole (``req.body``): answer it, now or later (by callback, setting
        ``req.cancel``, or in a task: ``req.conn.start_task``). Must not raise."""


class _NoEvent:
    """What uvicorn's protocol sets on a request's cycle when the connection goes (it has no waiter)."""

    @staticmethod
    def set() -> None:
        pass


_NO_EVENT = _NoEvent()


class DirectRequest:
    """One claimed request. It stands where uvicorn's protocol keeps a request's cycle
    (``response_complete``, ``disconnected``, ``keep_alive`` and ``message_event`` are what that
    code reads and writes), so connection handling is shared with ASGI requests."""

    __slots__ = (
        "conn",
        "path",
        "headers",
        "keep_alive",
        "expect_continue",
        "parts",
        "size",
        "max_body",
        "state",
        "cancel",
        "turn",
        "whole",
        "client_left",
        "response_complete",
        "disconnected",
        "message_event",
    )

    def __init__(
        self, conn: DirectHttpProtocol, path: bytes, headers: dict[bytes, bytes], keep_alive: bool, expect: bool
    ) -> None:
        self.conn = conn
        self.path = path  # as sent: percent-encoded
        self.headers = headers
        self.keep_alive = keep_alive
        self.expect_continue = expect
        self.parts: list[bytes] = []
        self.size = 0
        self.max_body = 0
        self.state: Any = None  # the app's, from ``begin`` to ``run``
        self.cancel: Callable[[], Any] | None = None  # called if the client goes before the answer
        self.turn = False  # the connection's earlier requests are answered
        self.whole = False  # the body is in
        self.client_left = False
        self.response_complete = False
        self.disconnected = False
        self.message_event = _NO_EVENT

    @property
    def body(self) -> bytes:
        parts = self.parts
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def respond(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """The answer: status line, headers (names in lower case, values already safe: the app's own),
        ``content-length`` and the body, in one write where small. Once only; nothing when the
        client has gone."""
        if self.response_complete:
            return
        self.response_complete = True
        conn = self.conn
        if self.disconnected:
            return
        if status == 413:  # a body too large is not read to its end: the connection ends
            self.keep_alive = False
        head = [_STATUS_LINE[status], _server_headers(conn.server_state.default_headers)]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"content-length: %d\r\n" % len(body))
        if not self.keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        transport = conn.transport
        if len(body) < JOIN_BELOW:
            head.append(body)
            transport.write(b"".join(head))
        else:
            transport.write(b"".join(head))
            transport.write(body)
        conn.answered(self)


def url_path(url: bytes) -> bytes:
    """The path of a request's URL, as sent (the origin form ``/p?q`` of nearly every request, or the
    absolute form ``http://host/p?q``); empty when the URL has none."""
    if url[:1] == b"/":
        return url.partition(b"?")[0]
    try:
        return httptools.parse_url(url).path or b""
    except httptools.HttpParserInvalidURLError:
        return b""


class DirectHttpProtocol(BoundedHttpProtocol):
    """``BoundedHttpProtocol`` with the requests ``direct_app`` claims answered by it directly."""

    direct_app: DirectApp | None = None
    _current: DirectRequest | None = None  # the direct request whose turn it is, until answered

    def on_headers_complete(self) -> None:
        app = self.direct_app
        path = url_path(self.url)
        if app is None or not app.claims(self.parser.get_method(), path):
            super().on_headers_complete()
            return
        self._head_done()
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        req = DirectRequest(self, path, dict(self.headers), keep_alive, self.expect_100_continue)
        earlier = self.cycle
        self.cycle = req  # type: ignore[assignment]
        if earlier is None or earlier.response_complete:
            self._turn(req)
        else:  # pipelined behind a request not yet answered: its turn comes in order
            self.flow.pause_reading()
            self.pipeline.appendleft((req, None))  # type: ignore[arg-type]

    def on_body(self, body: bytes) -> None:
        req = self.cycle
        if type(req) is not DirectRequest:
            super().on_body(body)
            return
        if req.response_complete or self._linger_until is not None:
            return  # answered before its body was read: the rest is dropped
        req.size += len(body)
        if req.turn and req.size > req.max_body:
            self._too_large(req)
            return
        req.parts.append(body)

    def on_message_complete(self) -> None:
        req = self.cycle
        if type(req) is not DirectRequest:
            super().on_message_complete()
            return
        self._message_done()
        req.whole = True
        if req.turn and not req.response_complete:
            self._run(req)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """A pipelined request's turn: a direct one is begun here, an ASGI one started as uvicorn does."""
        if type(cycle) is DirectRequest:
            self._turn(cycle)
        else:
            super()._start_asgi_task(cycle, app)

    def _turn(self, req: DirectRequest) -> None:
        req.turn = True
        self._current = req
        assert self.direct_app is not None
        self.direct_app.begin(req)
        if req.response_complete:
            return
        if req.size > req.max_body:  # it had arrived (pipelined) before its limit was known
            self._too_large(req)
            return
        if req.whole:
            self._run(req)
        elif req.expect_continue:
            self.transport.write(_CONTINUE)

    def _run(self, req: DirectRequest) -> None:
        assert self.direct_app is not None
        try:
            self.direct_app.run(req)
        except Exception:  # the app's bug: that request's 500, never the connection's parser
            log.exception("error answering POST %s", req.path[:200])
            req.respond(500, b'{"error":"internal error"}', [(b"content-type", b"application/json")])

    def start_task(self, req: DirectRequest, coro: Coroutine[Any, Any, None]) -> None:
        """Answer ``req`` in a task (cancelled if its client goes; waited for at shutdown)."""
        task = self.loop.create_task(coro)
        req.cancel = task.cancel
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _too_large(self, req: DirectRequest) -> None:
        req.response_complete = True
        req.parts = []
        self._current = None
        msg = f"body exceeds the {req.max_body} byte limit"
        self._refuse(json_error_response(413, "Content Too Large", msg))

    def answered(self, req: DirectRequest) -> None:
        """``req`` was answered: the connection closes (no keep-alive) or goes on to its next request."""
        if self._current is req:
            self._current = None
        if not req.keep_alive:
            if req.whole:
                self.transport.close()
            else:  # its body is still coming: read and drop it a while, then close
                self._linger_close()
            return
        self.on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        req = self._current
        super().connection_lost(exc)
        if req is not None and not req.response_complete:
            req.disconnected = True
            req.client_left = True
            if req.cancel is not None:
                req.cancel()
