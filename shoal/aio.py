"""Process plumbing shared by every shoal command: the event loop (uvloop where available) and
one-line-per-event logging."""

from __future__ import annotations

import asyncio
import logging
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


def setup_logging(level: str = "info", component: str = "shoal") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {component}[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def split_hostport(value: str, default_port: int) -> tuple[str, int]:
    """'host:port', ':port', 'host' or '[v6]:port' -> (host, port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if value.count(":") == 1:
        host, port = value.split(":")
        return host or "127.0.0.1", int(port)
    return value or "127.0.0.1", default_port
