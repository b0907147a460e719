"""The gateway's ports as Triton's users expect them, and what a connection's first bytes say when
it reached the wrong one. Pure: no I/O.

HTTP 8000 and gRPC 8001 are Triton's (and KServe's) ports, 8002 is where Triton serves metrics (and
where a worker's ``--health`` answers probes); the worker link takes the next one, 8003, so one
gateway's ports stay one block a firewall rule names (``--processes N`` takes 8003 up).
"""

from __future__ import annotations

HTTP_PORT = 8000
GRPC_PORT = 8001
WORKER_PORT = 8003

_HTTP1 = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")


def foreign_protocol(first: bytes) -> str | None:
    """What the first bytes of a connection speak when they are not a worker-link frame: "HTTP/2"
    (a gRPC client's preface, or a gRPC server's SETTINGS frame), "HTTP/1" (a request or a
    response), "TLS" (a handshake); None when they may be the worker link's."""
    if first.startswith(b"PRI * HTTP/2"):
        return "HTTP/2"
    if first.startswith(_HTTP1) or first.startswith(b"HTTP/1"):
        return "HTTP/1"
    if len(first) >= 9 and first[3] == 0x04 and first[5:9] == b"\0\0\0\0":  # SETTINGS on stream 0
        return "HTTP/2"
    if first[:2] == b"\x16\x03":
        return "TLS"
    return None


def worker_at_wrong_port(address: str, spoke: str | None) -> str:
    """The worker's one line when what answers at ``address`` is not a gateway's worker link."""
    what = f"it speaks {spoke}" if spoke else "no CHALLENGE came"
    return (
        f"{address} is not a gateway's worker link ({what}): is it the gateway's HTTP ({HTTP_PORT}) or "
        f"gRPC ({GRPC_PORT}) port? Workers dial the worker link, shoal cluster --workers "
        f"(default port {WORKER_PORT})"
    )
