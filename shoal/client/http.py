"""HTTP for the device side, on httpx: connection pools with keep-alive, timeouts, TLS verified
against the system's CAs (or ``ca_file``); ``send`` and ``asend`` make one ``core.Call``, blocking
or in asyncio, and answer a ``core.Reply`` or raise ``Unreachable``.

``OipHttpClient`` talks the Open Inference Protocol to one gateway directly (no central).

Plain HTTP/1.1: shoal's servers (uvicorn) do not speak HTTP/2, and a device holds few connections.
Proxy variables of the environment are not read: a device talks to the addresses it is given.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import ssl
import threading
import time
from typing import Any

import httpx
import numpy as np

import shoal
from shoal.client import failover
from shoal.client.core import Call, InferError, InferResult, Reply, Unreachable, error_message, model_path
from shoal.protocol.oip import build_infer_request, parse_infer_response

__all__ = [
    "InferError", "OipHttpClient", "Unreachable", "arace", "asend", "failure_kind", "new_async_client", "new_client",
    "race", "send",
]  # fmt: skip

USER_AGENT = f"shoal-client/{shoal.__version__}"
# Requests in flight at once per client (and per host); a device rarely needs more than a few.
MAX_CONNECTIONS = 100


# httpcore writes a request's head and body in two sends; with Nagle's algorithm the body then waits
# for the peer to acknowledge the head (measured: p50 2.4 ms against 0.9 ms for one echo request).
_NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def _options(timeout: float, ca_file: str | None) -> dict[str, Any]:
    # The system's trust store, as the standard library uses (httpx would use certifi's).
    return {
        "timeout": timeout,
        "trust_env": False,
        "headers": {"user-agent": USER_AGENT},
    }


def _transport(cls: Any, ca_file: str | None) -> Any:
    return cls(
        verify=ssl.create_default_context(cafile=ca_file),
        limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS),
        socket_options=_NO_DELAY,
    )


def new_client(timeout: float = 30.0, ca_file: str | None = None) -> httpx.Client:
    return httpx.Client(transport=_transport(httpx.HTTPTransport, ca_file), **_options(timeout, ca_file))


def new_async_client(timeout: float = 30.0, ca_file: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=_transport(httpx.AsyncHTTPTransport, ca_file), **_options(timeout, ca_file))


def _request(call: Call) -> dict[str, Any]:
    kw: dict[str, Any] = {"content": call.body, "headers": call.headers}
    if call.timeout is not None:
        kw["timeout"] = call.timeout
    return kw


def _unreachable(call: Call, e: httpx.TransportError) -> Unreachable:
    why = str(e) or type(e).__name__
    if "CERTIFICATE_VERIFY_FAILED" in why:  # a private CA: the one thing to do is to name it
        why += " (give the CA file that signed the server's certificate: --ca FILE, ca_file=)"
    elif isinstance(e, httpx.RemoteProtocolError) and call.url.startswith("http://"):
        why += " (if the server speaks TLS, its URL starts with https://)"
    failure = Unreachable(f"{call.method} {call.url}: {why}", kind=failure_kind(e))
    failure.__cause__ = e
    return failure


def failure_kind(e: httpx.TransportError) -> str:
    """What an exchange that failed met (``failover.py``): nothing connected (refused, no route, TLS
    refused: ``REFUSED``; no answer to the connect: ``CONNECT_TIMEOUT``), the connection reset or
    closed before the answer was in (``RESET``), or no answer in time (``TIMEOUT``); "" for what says
    nothing of the peer (this client's own pool full, a request it could not write)."""
    if isinstance(e, httpx.ConnectTimeout):
        return failover.CONNECT_TIMEOUT
    if isinstance(e, (httpx.ReadTimeout, httpx.WriteTimeout)):
        return failover.TIMEOUT
    if isinstance(e, (httpx.ConnectError, httpx.ProxyError)):
        return failover.REFUSED
    if isinstance(e, (httpx.ReadError, httpx.WriteError, httpx.CloseError, httpx.RemoteProtocolError)):
        return failover.RESET
    return ""


# No retry of a request on a connection the server closed while it was idle: httpx checks a pooled
# connection before sending on it (the standard library's client did not, so shoal retried once).


def send(client: httpx.Client, call: Call) -> Reply | Unreachable:
    """One exchange. A failure is answered, not raised, so that a flow can be handed it."""
    try:
        r = client.request(call.method, call.url, **_request(call))
    except httpx.TransportError as e:
        return _unreachable(call, e)
    return Reply(r.status_code, r.headers, r.content)


async def asend(client: httpx.AsyncClient, call: Call) -> Reply | Unreachable:
    try:
        r = await client.request(call.method, call.url, **_request(call))
    except httpx.TransportError as e:
        return _unreachable(call, e)
    return Reply(r.status_code, r.headers, r.content)


def _first_reply(outcomes: list[Reply | Unreachable | None]) -> list[Reply | Unreachable | None]:
    """Keep one ``Reply`` (the first in the calls' order, where several came in the same instant)."""
    seen = False
    out: list[Reply | Unreachable | None] = []
    for o in outcomes:
        if isinstance(o, Reply):
            out.append(None if seen else o)
            seen = True
        else:
            out.append(o)
    return out


def race(client: httpx.Client, calls: tuple[Call, ...]) -> list[Reply | Unreachable | None]:
    """``core.Race``: the calls at once (a daemon thread each), until one is answered or all failed;
    the others are abandoned (their threads end at their timeouts, and never hold the process's exit)."""
    done: queue.SimpleQueue[tuple[int, Reply | Unreachable]] = queue.SimpleQueue()
    for i, call in enumerate(calls):
        threading.Thread(target=lambda i=i, c=call: done.put((i, send(client, c))), daemon=True).start()
    out: list[Reply | Unreachable | None] = [None] * len(calls)
    for _ in calls:
        i, outcome = done.get()
        out[i] = outcome
        if isinstance(outcome, Reply):
            break
    return out


async def arace(client: httpx.AsyncClient, calls: tuple[Call, ...]) -> list[Reply | Unreachable | None]:
    """``core.Race`` in asyncio: the calls at once, until one is answered or all failed; the others
    are cancelled."""
    tasks = [asyncio.ensure_future(asend(client, c)) for c in calls]
    out: list[Reply | Unreachable | None] = [None] * len(calls)
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                out[tasks.index(t)] = t.result()
            if any(isinstance(o, Reply) for o in out):
                break
    finally:
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return _first_reply(out)


class OipHttpClient:
    """A synchronous Open Inference Protocol client for one gateway, over a keep-alive pool."""

    def __init__(
        self, base_url: str, token: str | None = None, timeout: float = 30.0, ca_file: str | None = None
    ) -> None:
        self.base = base_url.rstrip("/")
        self.token = token
        self._http = new_client(timeout, ca_file)

    @property
    def timeout(self) -> float | None:
        return self._http.timeout.read

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._http.timeout = httpx.Timeout(seconds)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OipHttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body); ``Unreachable`` (an ``OSError``) when the
        gateway cannot be reached."""
        h = dict(headers or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        reply = send(self._http, Call(method, self.base + path, body, h))
        if isinstance(reply, Unreachable):
            raise reply
        return reply.status, dict(reply.headers), reply.data

    def get_json(self, path: str) -> tuple[int, Any]:
        status, _, data = self.request("GET", path)
        return status, json.loads(data) if data else None

    def _exchange(
        self, model: str, version: str | None, body: bytes, headers: dict[str, str]
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        status, rh, data = self.request("POST", model_path(model, version) + "/infer", body, headers)
        if status != 200:
            ra = rh.get("retry-after")
            raise InferError(f"HTTP {status}: {error_message(data)}", status, float(ra) if ra else None)
        hl = rh.get("inference-header-content-length")
        return parse_infer_response(data, int(hl) if hl else None)

    def _answer(self, model: str, version: str | None, body: bytes, headers: dict[str, str]) -> dict[str, np.ndarray]:
        return self._exchange(model, version, body, headers)[1]

    def infer_result(
        self,
        model: str,
        inputs: dict[str, np.ndarray] | None = None,
        payload: bytes | None = None,
        version: str | None = None,
        labels: dict[str, list[str]] | None = None,
    ) -> InferResult:
        """Tensors (``inputs``) or one raw input (``payload``, e.g. a PNG) as an ``InferResult`` with
        the fields the routed client fills: the version that answered, the bytes sent, the timings."""
        if payload is not None:
            body = payload
            headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "0"}
        else:
            body, hl = build_infer_request(inputs or {}, binary=True, binary_output=True)
            headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(hl)}
        t0 = time.perf_counter()
        doc, outputs = self._exchange(model, version, body, headers)
        ms = (time.perf_counter() - t0) * 1000.0
        return InferResult(
            outputs,
            str(doc.get("model_name", model)),
            str(doc.get("model_version", version or "")),
            self.base,
            ms,
            labels or {},
            bytes_up=len(body),
            timings_ms={"remote": ms, "total": ms},
            gateway=self.base,
        )

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        version: str | None = None,
        binary: bool = True,
        outputs: list[str] | None = None,
    ) -> dict[str, np.ndarray]:
        body, hl = build_infer_request(inputs, binary=binary, binary_output=binary, outputs=outputs)
        headers = {"Content-Type": "application/octet-stream" if hl is not None else "application/json"}
        if hl is not None:
            headers["Inference-Header-Content-Length"] = str(hl)
        return self._answer(model, version, body, headers)

    def infer_raw(self, model: str, payload: bytes, version: str | None = None) -> dict[str, np.ndarray]:
        """Send one input as the raw body (for example a PNG or JPEG file's bytes)."""
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "0"}
        return self._answer(model, version, payload, headers)
