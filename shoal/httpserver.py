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
    ) -> None:
        self.sock = bind_tcp(host, port, backlog)
        self.port: int = self.sock.getsockname()[1]
        self.config = uvicorn.Config(
            app,
            http="httptools",
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
