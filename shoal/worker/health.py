"""A worker's health endpoint for orchestrators' probes (``shoal worker --health 0.0.0.0:8002``):
``GET /live`` answers 200 while the process runs, ``GET /ready`` 200 while the worker is logged in to
its gateway and serving, 503 otherwise (connecting, draining, its inference thread gone).

A worker has no HTTP stack of its own (it needs only its framework and the worker link); this is the
smallest honest HTTP/1.1 responder: one request per connection, bounded in size and time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

MAX_REQUEST = 8192
READ_TIMEOUT_S = 5.0


def _response(status: int, reason: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


def answer(request_head: bytes, ready: bool) -> bytes:
    """The response to one request head (pure: tested without sockets)."""
    line = request_head.split(b"\r\n", 1)[0].split(b" ")
    if len(line) != 3 or not line[2].startswith(b"HTTP/"):
        return _response(400, "Bad Request", b'{"error":"malformed request"}')
    method, path = line[0], line[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _response(405, "Method Not Allowed", b'{"error":"health takes GET"}')
    if path == b"/live":
        return _response(200, "OK", b'{"live":true}')
    if path == b"/ready":
        return _response(200, "OK", b'{"ready":true}') if ready else _response(
            503, "Service Unavailable", b'{"ready":false}'
        )
    return _response(404, "Not Found", b'{"error":"GET /live or /ready"}')


async def serve_health(host: str, port: int, ready: Callable[[], bool]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            writer.write(answer(head, ready()))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, limit=MAX_REQUEST)
