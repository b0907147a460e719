"""An HTTP server embedded in a component's own event loop: our socket, uvicorn's HTTP/1.1 machinery
(httptools), our lifecycle. uvicorn's ``serve()`` would also take over signal handling; central and
the gateways own their start and stop, so they run uvicorn's start-up and tick loop here.

Also the little pieces every server command shares: binding, the ports file, waiting for a signal.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Limits on a request's head (request line and headers), checked as bytes arrive, before the parser
# assembles anything: without them a 128 MB URL or header value is accumulated by repeated
# concatenation (quadratic time) while every other client of the event loop waits. The figures follow
# common servers: nginx's default buffers take 8 KiB per line; Apache allows 100 header fields; h11
# refuses a head over 16 KiB. Inference headers are few and short; tokens are under 4 KiB.
MAX_URL = 8 * 1024
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
# After refusing a request whose bytes are still arriving, stop writing (FIN) and read and discard
# what comes, so the client reads the answer instead of a reset (closing with unread bytes makes the
# kernel send RST, and a client still sending sees only that). Bounded as nginx's lingering close is:
# a total time, a time without data, and here a size too.
LINGER_S = 10.0
LINGER_IDLE_S = 2.0
LINGER_BYTES = 256 * 1024 * 1024
# How often each connection's read deadline and keep-alive wait are checked: a time-out fires up to
# this much late, never early.
SWEEP_S = 0.25


def json_error_response(status: int, reason: str, message: str) -> bytes:
    body = b'{"error":"' + message.encode() + b'"}'
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )


_TIMEOUT_RESPONSE = json_error_response(408, "Request Timeout", "request not received in time")
_URL_TOO_LONG = json_error_response(414, "URI Too Long", f"request line longer than {MAX_URL} bytes")
_HEAD_TOO_LARGE = json_error_response(
    431,
    "Request Header Fields Too Large",
    f"request headers larger than {MAX_HEAD} bytes or more than {MAX_HEADERS} fields",
)
_BAD_REQUEST = json_error_response(400, "Bad Request", "malformed HTTP request")


class _HeadTooLarge(Exception):
    def __init__(self, response: bytes) -> None:
        self.response = response


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on what a client may make the server hold:

    * the head of a request: a URL over ``MAX_URL`` bytes is 414, a head over ``MAX_HEAD`` bytes or
      with more than ``MAX_HEADERS`` fields is 431, each answered at once and the connection closed;
    * time: a client must send one whole request (head and body) within ``read_timeout_s`` of starting
      it, and send something within that time of connecting, or it gets 408 and a closed connection
      ("slowloris"). Idle time between requests stays under uvicorn's keep-alive timeout.

    Both times are deadlines kept on the connection and checked by the server's sweep
    (``EmbeddedHttpServer``, every ``SWEEP_S``), not timers: a timer armed and cancelled twice per
    request (the read time, then keep-alive) cost 3.3 µs of a request's 50 on the gateway.

    Errors are JSON like every other error of shoal's servers."""

    read_timeout_s = 30.0
    _read_deadline: float | None = None  # the request under way (or the first) must be whole by then
    _idle_since: float | None = None  # answered, keep-alive: waiting for the next request since then
    _in_head = True  # between the end of one request's head and the start of the next: False
    _head_bytes = 0
    _url_bytes = 0  # the URL so far, then the URL and header fields so far
    _header_count = 0
    _linger_until: float | None = None  # refused: reading and discarding until then
    _linger_left = 0
    _linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._linger_until is not None:
            self._linger(len(data))
            return
        self._idle_since = None
        if self._in_head:
            # Counted before parsing: a head arriving in many pieces is refused once it is too big,
            # however it is split. (Body bytes arriving with the head's end may count too: harmless.)
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._refuse(cause.response if isinstance(cause, _HeadTooLarge) else _BAD_REQUEST)
            return
        except httptools.HttpParserUpgrade:
            self._refuse(_BAD_REQUEST)  # no upgrades (websockets) on shoal's servers
            return
        except httptools.HttpParserError:
            self._refuse(_BAD_REQUEST)
            return
        if self._in_head and self._head_bytes > MAX_HEAD:
            self._refuse(_URL_TOO_LONG if self._header_count == 0 else _HEAD_TOO_LARGE)

    def on_message_begin(self) -> None:
        # uvicorn's, less its ASGI scope: made once the head is in, for a request ASGI answers
        # (``on_headers_complete``), not for the gateway's inference requests (``httpdirect.py``).
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._url_bytes = 0
        self._header_count = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > MAX_URL and self._header_count == 0:
            raise _HeadTooLarge(_URL_TOO_LONG)
        self.url += url  # uvicorn's on_url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._url_bytes += len(name) + len(value)  # the whole head, in one count (URL first)
        if self._header_count > MAX_HEADERS or self._url_bytes > MAX_HEAD:
            raise _HeadTooLarge(_HEAD_TOO_LARGE)
        # uvicorn's, in line: llhttp keeps a value's trailing whitespace, which RFC 9110 excludes.
        name = name.lower()
        value = value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._head_done()
        self.scope = {  # uvicorn's ASGI scope for the request, as its on_message_begin makes it
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._message_done()

    def _head_done(self) -> None:
        self._in_head = False
        self._head_bytes = 0

    def _message_done(self) -> None:
        self._in_head = True
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def _refuse(self, response: bytes, linger: bool = True) -> None:
        """Answer and close. With ``linger`` (the request may still be arriving), half-close and
        discard what the client still sends, within the bounds above, before closing."""
        self._disarm()
        if self.transport.is_closing() or self._linger_until is not None:
            return
        self.transport.write(response)
        if not linger:
            self.transport.close()
            return
        self._linger_close()

    def _linger_close(self) -> None:
        """Half-close and discard what the client still sends, within the bounds above, then close."""
        self._disarm()
        if self.transport.can_write_eof():  # TLS cannot half-close: it lingers without the FIN
            self.transport.write_eof()
        self._linger_until = self.loop.time() + LINGER_S
        self._linger_left = LINGER_BYTES
        self._linger(0)

    def _linger(self, n: int) -> None:
        self._linger_left -= n
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        assert self._linger_until is not None
        left = self._linger_until - self.loop.time()
        if self._linger_left < 0 or left <= 0:
            self.transport.close()  # enough: what is left unread makes the kernel reset
            return
        self._linger_timer = self.loop.call_later(min(LINGER_IDLE_S, left), self.transport.close)

    def _arm(self) -> None:
        self._read_deadline = self.loop.time() + self.read_timeout_s

    def _disarm(self) -> None:
        self._read_deadline = None

    def on_response_complete(self) -> None:
        """uvicorn's, with the keep-alive wait a time kept for the sweep rather than a timer."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:  # the next pipelined request's turn
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle_since = self.loop.time()

    def sweep(self, now: float) -> None:
        """The server's periodic check: a request not whole in time gets 408; a connection idle past
        the keep-alive timeout is closed."""
        if self._read_deadline is not None and now >= self._read_deadline:
            self._timed_out()
        elif self._idle_since is not None and now - self._idle_since >= self.timeout_keep_alive:
            self._idle_since = None
            if not self.transport.is_closing():
                self.transport.close()

    def _timed_out(self) -> None:
        self._read_deadline = None
        self._refuse(_TIMEOUT_RESPONSE, linger=False)  # it sent nothing for long: nothing to wait for


def bounded_protocol(
    read_timeout_s: float, base: type[BoundedHttpProtocol] = BoundedHttpProtocol, **attrs: Any
) -> type[HttpToolsProtocol]:
    return type(base.__name__, (base,), {"read_timeout_s": read_timeout_s, **attrs})


def bind_tcp(
    host: str, port: int, backlog: int, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """A TCP socket bound to host:port. ``reuse_port``: shared with other processes that bind it the
    same way (SO_REUSEPORT: the kernel spreads new connections over those listening)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, port))
    except OSError as e:  # said with the address: a command names what it could not have
        s.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    if listen:
        s.listen(backlog)
    s.setblocking(False)
    return s


class EmbeddedHttpServer:
    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        backlog: int = 4096,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        keep_alive_s: float = 60.0,
        read_timeout_s: float = 30.0,
        reuse_port: bool = False,
        protocol: type[BoundedHttpProtocol] = BoundedHttpProtocol,
        **protocol_attrs: Any,
    ) -> None:
        """``protocol``: the connection handler (``BoundedHttpProtocol`` or a subclass), given
        ``protocol_attrs`` as class attributes (``httpdirect.DirectHttpProtocol`` takes its
        ``direct_app`` so)."""
        self.sock = bind_tcp(host, port, backlog, reuse_port)
        self.port: int = self.sock.getsockname()[1]
        self.config = uvicorn.Config(
            app,
            http=bounded_protocol(read_timeout_s, protocol, **protocol_attrs),
            loop="none",
            lifespan="off",
            access_log=False,
            log_level="warning",
            backlog=backlog,
            timeout_keep_alive=int(keep_alive_s),
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
            server_header=False,
            proxy_headers=False,  # nothing sits in front of a shoal server by default
        )
        self.server = uvicorn.Server(self.config)
        self._tick: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None

    @property
    def stopping(self) -> bool:
        return bool(self.server.should_exit)

    async def start(self) -> None:
        self.config.load()
        self.server.lifespan = self.config.lifespan_class(self.config)
        await self.server.startup(sockets=[self.sock])
        # uvicorn's tick loop keeps the Date header current and notices should_exit.
        self._tick = asyncio.create_task(self.server.main_loop(), name="http-tick")
        self._sweeper = asyncio.create_task(self._sweep(), name="http-sweep")

    async def _sweep(self) -> None:
        """Every ``SWEEP_S``: each connection's read deadline and keep-alive wait (``sweep``)."""
        loop = asyncio.get_running_loop()
        connections = self.server.server_state.connections
        while True:
            await asyncio.sleep(SWEEP_S)
            now = loop.time()
            for c in list(connections):
                if isinstance(c, BoundedHttpProtocol):
                    c.sweep(now)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._tick is not None:
            await self._tick
        try:
            await self.server.shutdown()
        finally:
            if self._sweeper is not None:
                self._sweeper.cancel()


def write_ports_file(path: str | None, ports: dict[str, Any]) -> None:
    """Tell whoever started us (tests, the demo, supervisors) which ports we bound: atomically."""
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**ports, "pid": os.getpid()}, f)
    os.replace(tmp, path)


async def wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
