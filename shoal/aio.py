"""Process plumbing shared by every shoal command: the event loop (uvloop where available) and
one-line-per-event logging."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(main)
    except ImportError:
        return asyncio.run(main)


LIBRARY_LOGGERS = ("httpx", "httpcore", "urllib3", "filelock", "aiosqlite", "asyncio", "grpc", "multipart")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, component, pid, message, and any ``extra`` fields
    (``request_id``, ``worker``, ``model`` ...) a log call passed."""

    _std = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        import json

        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "component": self.component,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in self._std})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


# Collections of young objects after this many net allocations (Python's default: 700): a request
# allocates and frees hundreds, so the default collects many times a second for nothing.
GC_THRESHOLDS = (10_000, 10, 100)


def settle_gc() -> None:
    """For a long-running server, once started: what exists now (modules, the model, the app) leaves
    the collector's view (``gc.freeze``) and young objects are collected less often. Measured on the
    gateway under load (docs/benchmarks.md, "Garbage collection"): full collections walked every
    object 14 times in 8 s, up to 105 ms each, during which no request moved."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def setup_logging(level: str = "info", component: str = "shoal", fmt: str = "text") -> None:
    """One line per event on stderr: readable text, or JSON for log collectors."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(component))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {component}[%(process)d] %(levelname)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # Libraries speak up only for problems unless asked (httpx logs every request at INFO: the
    # gateway's report to central, every second).
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def split_hostport(value: str, default_port: int) -> tuple[str, int]:
    """'host:port', ':port', 'host' or '[v6]:port' -> (host, port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if value.count(":") == 1:
        host, port = value.split(":")
        return host or "127.0.0.1", int(port)
    return value or "127.0.0.1", default_port


class CoalescingProtocol(asyncio.Protocol):
    """A stream protocol whose writes made in one event-loop turn leave in one ``write``: under load
    this turns hundreds of small frame sends into a few large ones. Both ends of the worker link
    build on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._out: list[Any] = []
        self._flush_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, parts: list[Any]) -> None:
        self._out.extend(parts)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out = []


async def cancel_and_wait(tasks: list[asyncio.Task]) -> None:
    """Cancel background tasks and wait until each has ended, whatever it raised."""
    for t in tasks:
        t.cancel()
    for t in tasks:
        try:
            await t
        except (asyncio.CancelledError, Exception):
            pass
