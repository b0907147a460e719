"""The gateway's HTTP face: the Open Inference Protocol as a raw ASGI application.

No web framework on the hot path: routing is a dictionary lookup and a split (``protocol.oip``), bodies
are read once into bytes, responses are written with two ASGI messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shoal.gateway import repository
from shoal.gateway.auth import OPEN, AuthError, Principal, permit
from shoal.gateway.pool import RequestFailed
from shoal.gateway.results_api import record_request, results_action, serve_results
from shoal.protocol.compression import CompressionError, decompress
from shoal.protocol.oip import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    binary_response,
    bind_inputs,
    encode_infer_response,
    error_body,
    parse_infer_request,
    parse_path,
    parse_repository_path,
    valid_request_id,
)
from shoal.protocol.tensors import TensorError

if TYPE_CHECKING:
    from shoal.gateway.server import Gateway

log = logging.getLogger("shoal.gateway")
_JSON = [(b"content-type", b"application/json")]
_BINARY = [(b"content-type", b"application/octet-stream")]
# A JSON part larger than this (or a compressed body) is decoded on a thread, not the event loop.
BIG_JSON = 1 << 20
BIG_DECODES = 2  # at once: each holds a body and its decoded tensors
_ROUTE_ACTION = {"ready": "server", "server": "server", "model": "model", "model_ready": "model", "infer": "infer"}


class Forbidden(Exception):
    pass


class HttpApp:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.cfg = gw.config
        # Large bodies are decoded on threads, a few at a time: decoding is chunked, so the event
        # loop gets the interpreter back between chunks and other clients are not held up.
        self._big_decodes = asyncio.Semaphore(BIG_DECODES)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        try:
            await self._handle(scope, receive, send)
        except Exception:  # a bug must cost one request a JSON 500, never a traceback to the client
            log.exception("error answering %s %s", scope.get("method"), scope.get("path"))
            try:
                await _reply(send, 500, error_body("internal error (see the gateway's log)"))
            except Exception:  # the response had started, or the client left: nothing more to say
                pass

    async def _handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        t0 = time.monotonic()
        path = scope["path"]
        method = scope["method"]
        raw = _raw_path(scope)
        bad_path: ProtocolError | None = None  # answered once the credentials are checked
        try:
            route = parse_path(raw)
        except ProtocolError as e:
            route, bad_path = None, e
        if route is not None and route.kind == "live":
            await _reply(send, 200, b'{"live":true}')
            return
        headers = dict(scope["headers"])
        try:
            who = self.gw.auth.principal(headers.get(b"authorization"))
        except AuthError as e:
            self.gw.metrics.auth_refused.labels("401").inc()
            await _reply(send, 401, error_body(str(e)), [(b"www-authenticate", b'Bearer realm="shoal"')])
            return
        try:
            if bad_path is not None:
                raise bad_path
            if route is None:
                await self._other(who, method, path, raw, scope, receive, send)
                return
            self._check(who, _ROUTE_ACTION[route.kind], route.model or None, route.version)
            if route.kind == "infer":
                if method != "POST":
                    raise ProtocolError("infer takes POST", 405)
                await self._infer(who, route.model, route.version, headers, receive, send, t0)
                return
            if method != "GET":
                raise ProtocolError(f"{path} takes GET", 405)
            if route.kind == "ready":
                ok = self.gw.models.all_ready()
                await _reply(send, 200 if ok else 503, orjson.dumps({"ready": ok}))
            elif route.kind == "server":
                await _reply(send, 200, orjson.dumps(self.gw.server_metadata()))
            elif route.kind == "model" and route.model in self.gw.pipelines:
                await _reply(send, 200, orjson.dumps(self.gw.pipeline(route.model, route.version).metadata()))
            elif route.kind == "model_ready" and route.model in self.gw.pipelines:
                pl = self.gw.pipeline(route.model, route.version)
                body = {"name": route.model, "version": pl.spec.version, "ready": pl.ready}
                await _reply(send, 200 if pl.ready else 503, orjson.dumps(body))
            elif route.kind == "model":
                pool = self.gw.models.find(route.model, route.version)
                versions = sorted(self.gw.models.served_versions(route.model)) or sorted(
                    self.gw.models.models[route.model]
                )
                await _reply(send, 200, orjson.dumps(pool.spec.metadata(versions)))
            elif route.kind == "model_ready":
                pool = self.gw.models.find(route.model, route.version)
                ok = pool.ready
                body = {"name": route.model, "version": pool.spec.version, "ready": ok}
                await _reply(send, 200 if ok else 503, orjson.dumps(body))
        except Forbidden as e:
            self.gw.metrics.auth_refused.labels("403").inc()
            await _reply(send, 403, error_body(str(e)))
        except (ProtocolError, RequestFailed) as e:
            await self._fail(send, e)

    def _check(self, who: Principal, action: str, model: str | None = None, version: str | None = None) -> None:
        if who is OPEN:
            return
        why = permit(who, action, model, version)
        if why is not None:
            raise Forbidden(why)

    async def _other(
        self, who: Principal, method: str, path: str, raw: str, scope: dict[str, Any], receive: Any, send: Any
    ) -> None:
        """Everything that is not the Open Inference Protocol: metrics, status, stored results."""
        if path == "/metrics" and method == "GET":
            self._check(who, "metrics")
            await _reply(
                send,
                200,
                generate_latest(self.gw.metrics.registry),
                [(b"content-type", CONTENT_TYPE_LATEST.encode())],
            )
        elif path == "/v2/status" and method == "GET":
            self._check(who, "status")
            await _reply(send, 200, orjson.dumps(self.gw.status()))
        elif path.startswith("/v2/repository/"):
            self._check(who, "repository")
            await self._repository(method, raw, receive, send)
        elif (action := results_action(path)) is not None:
            self._check(who, action)
            await serve_results(self.gw.results, who, scope, receive, send)
        else:
            await _reply(send, 404, error_body(f"no such endpoint: {method} {path}"))

    # ----------------------------------------------------------------------------------- infer

    async def _read_body(self, headers: dict[bytes, bytes], receive: Any) -> bytes:
        limit = self.cfg.max_body_size
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                raise ProtocolError("bad Content-Length") from None
            if n > limit:
                raise ProtocolError(f"body of {n} bytes exceeds the {limit} byte limit", 413)
        msg = await receive()
        body = msg.get("body", b"")
        if not msg.get("more_body"):
            return body
        parts = [body]
        size = len(body)
        while msg.get("more_body"):
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ProtocolError("client went away", 499)
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"body exceeds the {limit} byte limit", 413)
            parts.append(chunk)
        return b"".join(parts)

    async def _infer(
        self,
        who: Principal,
        model: str,
        version: str | None,
        headers: dict[bytes, bytes],
        receive: Any,
        send: Any,
        t0: float,
    ) -> None:
        pipeline = self.gw.pipeline(model, version) if model in self.gw.pipelines else None
        pool = None
        if pipeline is not None:
            try:
                spec = pipeline.interface()
            except RequestFailed as e:
                raise RequestFailed(f"pipeline '{model}' is not ready: {e}", 503) from None
        else:
            pool = self.gw.models.find(model, version)
            spec = pool.spec
        body = await self._read_body(headers, receive)
        enc = headers.get(b"content-encoding")
        hl_raw = headers.get(HEADER_LENGTH.encode())
        try:
            hl = int(hl_raw) if hl_raw is not None else None
        except ValueError:
            raise ProtocolError("Inference-Header-Content-Length must be an integer") from None
        if enc is None and (len(body) if hl is None else hl) <= BIG_JSON:
            req = parse_infer_request(body, hl, self.cfg.max_body_size)  # the common case, decoded here
        else:
            async with self._big_decodes:
                encoding = enc.decode("latin-1") if enc is not None else None
                req = await asyncio.to_thread(self._decode, body, encoding, hl)
        arrays = bind_inputs(req, spec.inputs, spec.image_input, spec.max_batch_size)
        if req.outputs is not None:
            known = {o.name for o in spec.outputs}
            for o in req.outputs:
                if o.name not in known:
                    raise ProtocolError(
                        f"unknown output '{o.name}'; the model's outputs are {', '.join(known)}"
                    )
        timeout = self.cfg.request_timeout_s
        t = req.parameters.get("timeout_ms")
        if isinstance(t, (int, float)) and t > 0:
            timeout = min(timeout, t / 1000.0)
        xrid = headers.get(b"x-request-id")
        if xrid is not None and not req.id:
            xs = xrid.decode("latin-1")
            if not valid_request_id(xs):
                raise ProtocolError("X-Request-Id must be 1 to 256 printable ASCII characters")
            rid = xs
        else:
            rid = req.id or self.gw.new_request_id()
        try:
            if pipeline is not None:
                outputs = await pipeline.run(
                    arrays, t0 + timeout, lambda p, a, d: self.gw.call_model(p, a, d, None, rid)
                )
            elif req.outputs is None and req.binary_output and self.gw.results is None:
                # The common binary case: the worker's result bytes become the response as they are.
                assert pool is not None
                h, payload = await self.gw.call_model(pool, arrays, t0 + timeout, None, rid, raw=True)
                try:
                    out, hlen = binary_response(spec.name, spec.version, req.id, h.outputs, payload)
                except (TensorError, KeyError) as e:
                    raise RequestFailed(f"worker sent a malformed result: {e}", 502) from None
                await _reply(
                    send,
                    200,
                    out,
                    [
                        *_BINARY,
                        (b"inference-header-content-length", str(hlen).encode()),
                        (b"x-request-id", rid.encode("latin-1", "replace")),
                    ],
                )
                self.gw.metrics.observe_response(spec, 200, time.monotonic() - t0)
                return
            else:
                assert pool is not None
                names = [o.name for o in req.outputs] if req.outputs is not None else None
                outputs = await self.gw.call_model(pool, arrays, t0 + timeout, names, rid)
        except RequestFailed as e:
            self.gw.metrics.observe_response(spec, e.status, time.monotonic() - t0)
            if e.status >= 500:
                log.warning(
                    "request %s to %s failed: %s", rid, model, e, extra={"request_id": rid, "model": model}
                )
            e.request_id = rid
            if self.gw.results is not None:
                record_request(self.gw.results, rid, spec, arrays, None, e.status, t0, who.who, str(e))
            raise
        # With result storage the response carries rid: the device can fetch the stored result later.
        answer_id = req.id if self.gw.results is None else rid
        encode = (spec.name, spec.version, answer_id, outputs, req.outputs, req.binary_output)
        if req.binary_output or _nbytes(outputs) <= BIG_JSON:
            out, hlen = encode_infer_response(*encode)
        else:  # a large JSON answer is written on a thread, as large requests are read
            async with self._big_decodes:
                out, hlen = await asyncio.to_thread(encode_infer_response, *encode)
        if self.gw.results is not None:
            record_request(self.gw.results, rid, spec, arrays, outputs, 200, t0, who.who)
        ridh = (b"x-request-id", rid.encode("latin-1", "replace"))
        if hlen is None:
            await _reply(send, 200, out, [*_JSON, ridh])
        else:
            await _reply(
                send,
                200,
                out,
                [
                    (b"content-type", b"application/octet-stream"),
                    (b"inference-header-content-length", str(hlen).encode()),
                    ridh,
                ],
            )
        self.gw.metrics.observe_response(spec, 200, time.monotonic() - t0)

    def _decode(self, body: bytes, encoding: str | None, hl: int | None) -> InferRequest:
        """Decompress and parse a body (pure work: the caller picks the thread)."""
        limit = self.cfg.max_body_size
        if encoding is not None:
            try:
                body = decompress(body, encoding, limit)
            except CompressionError as e:
                raise ProtocolError(str(e), e.status) from None
        return parse_infer_request(body, hl, limit)

    async def _repository(self, method: str, path: str, receive: Any, send: Any) -> None:
        """Model management (Triton's repository extension): index, load, unload."""
        if method != "POST":
            raise ProtocolError(f"{path} takes POST", 405)
        body = await self._read_body({}, receive)
        try:
            doc = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as e:
            raise ProtocolError(f"malformed JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ProtocolError("the body must be a JSON object")
        target = parse_repository_path(path)
        try:
            if target is not None and target[1] is None:
                rows = repository.index(self.gw, bool(doc.get("ready", False)))
                await _reply(send, 200, orjson.dumps(rows))
                return
            if target is not None and target[1] is not None:
                action, name = target
                await (repository.load if action == "load" else repository.unload)(self.gw, name)
                await _reply(send, 200, b"{}")
                return
        except repository.RepositoryError as e:
            raise ProtocolError(str(e), e.status) from None
        await _reply(send, 404, error_body(f"no such endpoint: {method} {path}"))

    async def _fail(self, send: Any, e: ProtocolError | RequestFailed) -> None:
        extra = []
        if isinstance(e, RequestFailed) and e.retry_after is not None:
            extra.append((b"retry-after", str(e.retry_after).encode()))
        rid = getattr(e, "request_id", None)
        if rid:
            extra.append((b"x-request-id", rid.encode("latin-1", "replace")))
        self.gw.metrics.http_errors.labels(str(e.status)).inc()
        await _reply(send, e.status, error_body(str(e)), extra or None)


def _nbytes(arrays: dict[str, Any]) -> int:
    n = 0
    for a in arrays.values():
        n += a.nbytes
    return n


def _raw_path(scope: dict[str, Any]) -> str:
    """The path as the client sent it, percent-encoded: names in it are decoded once, by segment
    (``oip.path_segments``). The server's decoded ``path`` is the same when nothing is encoded."""
    raw = scope.get("raw_path")
    if raw is None or b"%" not in raw:
        return scope["path"]
    return raw.decode("latin-1")


async def _reply(
    send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    if headers is None or not any(k == b"content-type" for k, _ in headers):
        headers = _JSON + (headers or [])
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
