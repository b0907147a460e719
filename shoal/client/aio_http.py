"""A small asyncio HTTP/1.1 client: one keep-alive connection, one request at a time, TLS verified.

Used by the gateway to report to central and by the async device client. Standard library only.
Responses are bounded (``max_body``) and the parser accepts exactly what it understands:
``Content-Length`` bodies and chunked transfer coding.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 64 * 1024


class HttpError(OSError):
    """The connection failed or the peer spoke something that is not HTTP/1.1."""


class AsyncHttpConnection:
    def __init__(
        self,
        base_url: str,
        timeout: float = 10.0,
        ca_file: str | None = None,
        max_body: int = 64 * 1024 * 1024,
    ) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.base = u.path.rstrip("/")
        self.ssl = ssl.create_default_context(cafile=ca_file) if u.scheme == "https" else None
        self.timeout = timeout
        self.max_body = max_body
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._w is not None:
            self._w.close()
            try:
                await self._w.wait_closed()
            except (OSError, ssl.SSLError):
                pass
        self._r = self._w = None

    async def _open(self) -> None:
        self._r, self._w = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=MAX_HEADER_BYTES), self.timeout
        )

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        async with self._lock:
            for attempt in range(2):
                fresh = self._w is None
                if fresh:
                    await self._open()
                try:
                    return await asyncio.wait_for(
                        self._exchange(method, path, body, headers or {}), self.timeout
                    )
                except (ConnectionError, asyncio.IncompleteReadError, HttpError) as e:
                    await self.close()
                    # A reused keep-alive connection may have been closed by the server while idle:
                    # try once more on a fresh one.
                    if fresh or attempt:
                        raise HttpError(f"{method} {self.host}:{self.port}{path}: {e}") from None
                except BaseException:
                    await self.close()
                    raise
        raise AssertionError("unreachable")

    async def _exchange(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        assert self._r is not None and self._w is not None
        lines = [
            f"{method} {self.base}{path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self._w.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await self._w.drain()
        try:
            head = await self._r.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise HttpError("response headers too large") from None
        status_line, *hdr_lines = head[:-4].decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP/1.1 response: {status_line[:80]!r}")
        status = int(parts[1])
        hdrs: dict[str, str] = {}
        for line in hdr_lines:
            k, sep, v = line.partition(":")
            if sep:
                hdrs[k.strip().lower()] = v.strip()
        if hdrs.get("transfer-encoding", "").lower() == "chunked":
            data = await self._read_chunked()
        else:
            n = int(hdrs.get("content-length", "0") or 0)
            if n < 0 or n > self.max_body:
                raise HttpError(f"response body of {n} bytes exceeds the {self.max_body} byte limit")
            data = await self._r.readexactly(n) if n else b""
        if hdrs.get("connection", "").lower() == "close":
            await self.close()
        return status, hdrs, data

    async def _read_chunked(self) -> bytes:
        assert self._r is not None
        out = bytearray()
        while True:
            size_line = await self._r.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise HttpError("bad chunk size") from None
            if size == 0:
                await self._r.readuntil(b"\r\n")
                return bytes(out)
            if len(out) + size > self.max_body:
                raise HttpError(f"response body exceeds the {self.max_body} byte limit")
            out += await self._r.readexactly(size)
            await self._r.readexactly(2)
