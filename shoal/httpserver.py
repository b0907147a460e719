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

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_TIMEOUT_BODY = b'{"error":"request not received in time"}'
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY
)


class ReadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a limit on how long a client may take to send one whole
    request (headers and body), and to send anything at all after connecting. A client that trickles
    bytes ("slowloris") gets 408 and a closed connection instead of holding it forever. Idle time
    between requests stays under uvicorn's keep-alive timeout."""

    read_timeout_s = 30.0
    _read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _timed_out(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()


def read_timeout_protocol(seconds: float) -> type[HttpToolsProtocol]:
    return type("ReadTimeoutProtocol", (ReadTimeoutProtocol,), {"read_timeout_s": seconds})


def bind_tcp(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
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
    ) -> None:
        self.sock = bind_tcp(host, port, backlog)
        self.port: int = self.sock.getsockname()[1]
        self.config = uvicorn.Config(
            app,
            http=read_timeout_protocol(read_timeout_s),
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

    @property
    def stopping(self) -> bool:
        return bool(self.server.should_exit)

    async def start(self) -> None:
        self.config.load()
        self.server.lifespan = self.config.lifespan_class(self.config)
        await self.server.startup(sockets=[self.sock])
        # uvicorn's tick loop keeps the Date header current and notices should_exit.
        self._tick = asyncio.create_task(self.server.main_loop(), name="http-tick")

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._tick is not None:
            await self._tick
        await self.server.shutdown()


def write_ports_file(path: str | None, ports: dict[str, int]) -> None:
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
