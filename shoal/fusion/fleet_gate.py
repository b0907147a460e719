"""The public face of a federation's SuperLink: it passes Flower's Fleet API and nothing else.

Flower 1.42 serves three APIs on one port: the Fleet API (SuperNodes), the Control API (enrolling
SuperNodes, starting runs) and the Runtime API (the ServerApp). The open-source build has no account
authentication on the Control API, so whoever reaches that port could enrol a key of their own and
join. ``shoal federation superlink`` therefore binds the SuperLink to a private address and puts
this gate on the public one: requests under ``/v1/fleet/`` (and the health check) are forwarded
unchanged, anything else is answered 403. SuperNode authentication signs a timestamp, not the
address, so it works through the gate; enrolling and starting runs happen on the private address.

A raw ASGI app on uvicorn (TLS with the federation's certificate), forwarding with httpx.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

ALLOWED_PREFIXES = ("/v1/fleet/", "/health")
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the forwarding itself sets.
_DROP = {
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"upgrade",
    b"te",
    b"trailer",
    b"host",
    b"content-length",
}
MAX_BODY = 512 * 1024 * 1024  # model weights travel through here

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def allowed(path: str) -> bool:
    return path.startswith(ALLOWED_PREFIXES)


class FleetGate:
    """Forward the Fleet API to ``upstream`` (``https://127.0.0.1:PORT``), refuse everything else."""

    def __init__(self, upstream: str, ca_file: str | None, timeout_s: float = 300.0) -> None:
        self.upstream = upstream.rstrip("/")
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self.client = httpx.AsyncClient(base_url=self.upstream, verify=verify, timeout=timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if not allowed(path):
            await _reply(
                send,
                403,
                "only the Fleet API is served here; enrol sites and start runs on the private address",
            )
            return
        body = bytearray()
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if len(body) > MAX_BODY:
                await _reply(send, 413, "request body too large")
                return
            if not msg.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _DROP]
        url = path + (("?" + scope["query_string"].decode("latin-1")) if scope.get("query_string") else "")
        try:
            r = await self.client.request(scope["method"], url, content=bytes(body), headers=headers)
        except httpx.HTTPError as e:
            await _reply(send, 502, f"the SuperLink did not answer: {type(e).__name__}")
            return
        out = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in r.headers.items()
            if k.encode() not in _DROP
        ]
        out.append((b"content-length", str(len(r.content)).encode()))
        await send({"type": "http.response.start", "status": r.status_code, "headers": out})
        await send({"type": "http.response.body", "body": r.content})


async def _reply(send: Send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve(host: str, port: int, upstream: str, ca_file: str, cert_file: str, key_file: str) -> None:
    """Run the gate until interrupted (blocking)."""
    import uvicorn

    uvicorn.run(
        FleetGate(upstream, ca_file),
        host=host,
        port=port,
        ssl_certfile=cert_file,
        ssl_keyfile=key_file,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,  # SuperNodes hold connections open; do not wait on them
    )
