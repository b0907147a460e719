"""The gateway's HTTP face: the Open Inference Protocol as a raw ASGI application.

No web framework on the hot path: routing is a dictionary lookup and a split (``protocol.oip``), bodies
are read once into bytes, responses are written with two ASGI messages. The app holds the parts it
uses (the request service, credentials, metrics, views, the repository API, the result store), never
the gateway itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import shoal
from shoal.gateway.auth import OPEN, Authenticator, AuthError, Principal, permit
from shoal.gateway.metrics import GatewayMetrics
from shoal.gateway.openapi import openapi_document
from shoal.gateway.pool import Pending, RequestFailed
from shoal.gateway.quotas import Quotas
from shoal.gateway.repository import RepositoryApi, RepositoryError
from shoal.gateway.requests import RequestService, Target, outputs_of
from shoal.gateway.results_api import record_request, results_action, serve_results
from shoal.gateway.views import GatewayViews
from shoal.protocol.classification import ClassificationError, classify
from shoal.protocol.compression import CompressionError, decompress
from shoal.protocol.interface import ModelInterface
from shoal.protocol.model_config import model_config
from shoal.protocol.oip import (
    HEADER_LENGTH,
    MAX_PRIORITY,
    PRIORITY_HEADER,
    TIMEOUT_HEADER,
    InferRequest,
    PathRoute,
    ProtocolError,
    binary_response,
    bind_inputs,
    class_counts,
    encode_infer_response,
    error_body,
    header_number,
    parse_infer_request,
    parse_path,
    parse_repository_path,
    request_priority,
    request_timeout_ms,
    valid_request_id,
)
from shoal.protocol.tensors import TensorError

if TYPE_CHECKING:
    from shoal.gateway.storage import ResultStore
    from shoal.gateway.tracing import RequestTrace, Tracing
    from shoal.httpdirect import DirectRequest

log = logging.getLogger("shoal.gateway")
_JSON = [(b"content-type", b"application/json")]
_BINARY = [(b"content-type", b"application/octet-stream")]
_HEADER_LENGTH = HEADER_LENGTH.encode()
# A JSON part larger than this (or a compressed body) is decoded on a thread, not the event loop.
BIG_JSON = 1 << 20
BIG_DECODES = 2  # at once: each holds a body and its decoded tensors
# What each protocol route needs of a credential (``auth.permit``).
_ROUTE_ACTION = {
    "ready": "server",
    "server": "server",
    "model": "model",
    "model_ready": "model",
    "infer": "infer",
    "stats": "model",  # one model's; every model's is "all_stats"
    "config": "model",
}


class Forbidden(Exception):
    pass


@dataclass(frozen=True)
class HttpLimits:
    max_body_size: int = 64 * 1024 * 1024
    request_timeout_s: float = 30.0


class HttpApp:
    def __init__(
        self,
        service: RequestService,
        auth: Authenticator,
        metrics: GatewayMetrics,
        views: GatewayViews,
        repository: RepositoryApi,
        results: ResultStore | None,
        limits: HttpLimits,
        quotas: Quotas | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.service = service
        self.quotas = quotas
        self.tracing = tracing
        self.models = service.models
        self.auth = auth
        self.metrics = metrics
        self.views = views
        self.repository = repository
        self.results = results
        self.limits = limits
        # Large bodies are decoded on threads, a few at a time: decoding is chunked, so the event
        # loop gets the interpreter back between chunks and other clients are not held up.
        self._big_decodes = asyncio.Semaphore(BIG_DECODES)
        self._openapi: bytes | None = None  # the OpenAPI document, made when first asked for
        # The protocol's GET routes, by kind; infer has a handler of its own.
        self.gets: dict[str, Callable[[PathRoute], Awaitable[tuple[int, dict[str, Any]]]]] = {
            "ready": self._ready,
            "server": self._server,
            "model": self._model,
            "model_ready": self._model_ready,
            "stats": self._stats,
            "config": self._config,
        }

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
            who = self.auth.principal(headers.get(b"authorization"))
        except AuthError as e:
            self.metrics.auth_refused.labels("401").inc()
            await _reply(send, 401, error_body(str(e)), [(b"www-authenticate", b'Bearer realm="shoal"')])
            return
        try:
            if bad_path is not None:
                raise bad_path
            if route is None:
                await self._other(who, method, scope["path"], raw, scope, receive, send)
                return
            action = _ROUTE_ACTION[route.kind] if route.model or route.kind != "stats" else "all_stats"
            self.check(who, action, route.model or None, route.version)
            if route.kind == "infer":  # a POST is the server's to hand to ``begin`` and ``run``
                raise ProtocolError("infer takes POST", 405)
            if method != "GET":
                raise ProtocolError(f"{scope['path']} takes GET", 405)
            status, body = await self.gets[route.kind](route)
            await _reply(send, status, orjson.dumps(body))
        except Forbidden as e:
            self.metrics.auth_refused.labels("403").inc()
            await _reply(send, 403, error_body(str(e)))
        except (ProtocolError, RequestFailed) as e:
            await self._fail(send, e)

    def check(self, who: Principal, action: str, model: str | None = None, version: str | None = None) -> None:
        if who is OPEN:
            return
        why = permit(who, action, model, version)
        if why is not None:
            raise Forbidden(why)

    # ------------------------------------------------------------------------------ reads

    async def _ready(self, route: PathRoute) -> tuple[int, dict[str, Any]]:
        ok = self.models.all_ready()
        return (200 if ok else 503), {"ready": ok}

    async def _server(self, route: PathRoute) -> tuple[int, dict[str, Any]]:
        return 200, self.views.server_metadata()

    async def _model(self, route: PathRoute) -> tuple[int, dict[str, Any]]:
        if route.model in self.service.pipelines:
            return 200, self.service.pipeline(route.model, route.version).metadata()
        pool = self.models.find(route.model, route.version)
        versions = sorted(self.models.served_versions(route.model)) or sorted(self.models.models[route.model])
        return 200, pool.spec.metadata(versions)

    async def _model_ready(self, route: PathRoute) -> tuple[int, dict[str, Any]]:
        if route.model in self.service.pipelines:
            pl = self.service.pipeline(route.model, route.version)
            version, ok = pl.spec.version, pl.ready
        else:
            pool = self.models.find(route.model, route.version)
            version, ok = pool.spec.version, pool.ready
        return (200 if ok else 503), {"name": route.model, "version": version, "ready": ok}

    async def _stats(self, route: PathRoute) -> tuple[int, dict[str, Any]]:
        """Triton's statistics of a model (its version, else every version it has), or of every model
        and pipeline."""
        return 200, self.metrics.stats.document(self.views.stats_versions(route.model, route.version))

    async def _config(self, route: PathRoute) -> tuple[int, dict[str, Any]]:
        """Triton's configuration of a model version or pipeline (``protocol/model_config.py``)."""
        if route.model in self.service.pipelines:
            return 200, self.service.pipeline(route.model, route.version).config()
        return 200, model_config(self.models.find(route.model, route.version).spec)

    async def _other(
        self, who: Principal, method: str, path: str, raw: str, scope: dict[str, Any], receive: Any, send: Any
    ) -> None:
        """Everything that is not the Open Inference Protocol: metrics, status, the repository API,
        stored results."""
        if path == "/metrics" and method == "GET":
            self.check(who, "metrics")
            body = generate_latest(self.metrics.registry)
            await _reply(send, 200, body, [(b"content-type", CONTENT_TYPE_LATEST.encode())])
        elif path == "/v2/openapi.json" and method == "GET":
            self.check(who, "server")
            if self._openapi is None:
                self._openapi = orjson.dumps(openapi_document(shoal.__version__, self.results is not None))
            await _reply(send, 200, self._openapi)
        elif path == "/v2/status" and method == "GET":
            self.check(who, "status")
            await _reply(send, 200, orjson.dumps(self.views.status()))
        elif path.startswith("/v2/repository/"):
            self.check(who, "repository")
            await self._repository(method, raw, receive, send)
        elif (action := results_action(path)) is not None:
            self.check(who, action)
            await serve_results(self.results, who, scope, receive, send)
        else:
            await _reply(send, 404, error_body(f"no such endpoint: {method} {path}"))

    # ------------------------------------------------------------------------------ infer

    def claims(self, method: bytes, path: bytes) -> bool:
        """The requests the server hands to ``begin`` and ``run`` without ASGI: inference."""
        return method == b"POST" and path.startswith(b"/v2/models/") and path.endswith(b"/infer")

    def begin(self, req: DirectRequest) -> None:
        """An inference request's head is in: what can be checked before its body is (where it goes,
        credentials, quota, the declared length, and, under overload, whether its deadline can be
        met) is, and answered at once when it fails."""
        t0 = time.monotonic()
        headers = req.headers
        try:
            who = self.auth.principal(headers.get(b"authorization"))
        except AuthError as e:
            self.metrics.auth_refused.labels("401").inc()
            req.respond(401, error_body(str(e)), [*_JSON, (b"www-authenticate", b'Bearer realm="shoal"')])
            return
        try:
            raw = req.path.decode("latin-1")
            route = parse_path(raw)
            if route is None:
                raise ProtocolError(f"no such endpoint: POST {_decoded(raw)}", 404)
            if route.kind != "infer":
                raise ProtocolError(f"{_decoded(raw)} takes GET", 405)
            self.check(who, "infer", route.model, route.version)
            if self.quotas is not None:
                self.charge(who, t0)
            target = self.service.target(route.model, route.version)
            raw_ms = headers.get(TIMEOUT_HEADER)
            if raw_ms is not None and target.pool is not None:  # overloaded: refused before its body is read
                ms = header_number(raw_ms, "X-Request-Timeout-Ms", 1 << 31)
                if ms > 0:
                    budget = min(self.limits.request_timeout_s, ms / 1000.0)
                    self.service.dispatcher.refuse_if_late(target.pool, 0, t0 + budget, True, t0)
            req.max_body = self._body_limit(headers)
        except Forbidden as e:
            self.metrics.auth_refused.labels("403").inc()
            req.respond(403, error_body(str(e)), _JSON)
            return
        except (ProtocolError, RequestFailed) as e:
            req.respond(*self._failure(e))
            return
        except Exception:  # a bug must cost one request a JSON 500, never the connection
            log.exception("error answering POST %s", req.path[:200])
            req.respond(500, error_body("internal error (see the gateway's log)"), _JSON)
            return
        req.state = (who, target, t0)

    def run(self, req: DirectRequest) -> None:
        """An inference request's body is in: its tensors checked against the model, its deadline
        and id, the call, the answer. The common case (a model's pool, a small body, neither result
        storage nor tracing) waits for its answer by callback; the rest in a task. A client that
        disconnects while it waits cancels it (``req.cancel``): not yet sent to a worker, it never
        runs."""
        who, target, t0 = req.state
        headers = req.headers
        body = req.body
        pool = target.pool
        try:
            hl = _header_length(headers)
            if (
                pool is None
                or self.results is not None
                or self.tracing is not None
                or b"content-encoding" in headers
                or (len(body) if hl is None else hl) > BIG_JSON
            ):
                req.conn.start_task(req, self._run_task(req))
                return
            oip = parse_infer_request(body, hl, self.limits.max_body_size)
            arrays, deadline, priority, told, rid = self._bind(oip, target, headers, t0)
            names = [o.name for o in oip.outputs] if oip.outputs is not None else None
        except (ProtocolError, RequestFailed) as e:
            req.respond(*self._failure(e))
            return
        except Exception:
            log.exception("error answering POST %s", req.path[:200])
            req.respond(500, error_body("internal error (see the gateway's log)"), _JSON)
            return
        try:
            p = self.service.submit(pool, arrays, deadline, names, rid, priority, told)
        except RequestFailed as e:  # refused at once: overloaded, saturated, too large for the link
            self._model_failed(req, target, rid, t0, e)
            return
        req.cancel = partial(self._client_left, p, target, t0)
        p.future.add_done_callback(partial(self._answered, req, target, oip, rid, t0))

    def _answered(
        self, req: DirectRequest, target: Target, oip: InferRequest, rid: str, t0: float, fut: asyncio.Future
    ) -> None:
        """The answer of a request ``run`` sent by callback (its client may have left: then nothing)."""
        if fut.cancelled():
            return
        try:
            e = fut.exception()
            if e is not None:
                raise e
            h, payload = fut.result()
            if oip.outputs is None and oip.binary_output:
                req.respond(200, *self._binary_answer(target, oip, rid, h, payload))
            else:
                outputs = outputs_of(h, payload)
                if oip.outputs is not None:
                    outputs = classified(oip, target.spec, outputs)
                if not oip.binary_output and _nbytes(outputs) > BIG_JSON:  # written on a thread
                    req.conn.start_task(req, self._answer_large(req, target, oip, rid, outputs, t0))
                    return
                req.respond(200, *self._answer(target, oip, oip.id, rid, outputs))
        except RequestFailed as e:
            self._model_failed(req, target, rid, t0, e)
            return
        except ProtocolError as e:  # classification it cannot do
            req.respond(*self._failure(e, rid))
            return
        except Exception:
            log.exception("error answering POST %s", req.path[:200])
            req.respond(500, error_body("internal error (see the gateway's log)"), _JSON)
            return
        self.metrics.observe_response(target.spec, 200, time.monotonic() - t0)

    def _model_failed(self, req: DirectRequest, target: Target, rid: str, t0: float, e: RequestFailed) -> None:
        self.metrics.observe_response(target.spec, e.status, time.monotonic() - t0)
        self._log_failure(target, rid, e)
        req.respond(*self._failure(e, rid))

    def _client_left(self, p: Pending, target: Target, t0: float) -> None:
        self.service.client_left(p)
        self.metrics.observe_response(target.spec, 499, time.monotonic() - t0)

    async def _answer_large(
        self, req: DirectRequest, target: Target, oip: InferRequest, rid: str, outputs: dict[str, np.ndarray], t0: float
    ) -> None:
        async with self._big_decodes:
            answer = await asyncio.to_thread(self._answer, target, oip, oip.id, rid, outputs)
        req.respond(200, *answer)
        self.metrics.observe_response(target.spec, 200, time.monotonic() - t0)

    async def _run_task(self, req: DirectRequest) -> None:
        who, target, t0 = req.state
        try:
            await self._infer(req, who, target, t0)
        except (ProtocolError, RequestFailed) as e:
            req.respond(*self._failure(e))
        except asyncio.CancelledError:
            if not req.client_left:
                raise
        except Exception:
            log.exception("error answering POST %s", req.path[:200])
            req.respond(500, error_body("internal error (see the gateway's log)"), _JSON)

    def _bind(
        self, oip: InferRequest, target: Target, headers: dict[bytes, bytes], t0: float
    ) -> tuple[dict[str, np.ndarray], float, int, bool, str]:
        """A parsed request checked against its model: its arrays, deadline, priority, whether the
        deadline is the client's own, and its id."""
        arrays = bind_inputs(oip, target.spec.inputs, target.spec.image_input, target.spec.max_batch_size)
        if oip.outputs is not None:
            check_outputs(oip, target)
        budget, priority = self.budget(oip.parameters, headers)
        return arrays, t0 + budget, priority, budget < self.limits.request_timeout_s, oip.id or self._request_id(headers)

    def _binary_answer(
        self, target: Target, oip: InferRequest, rid: str, h: Any, payload: Any
    ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The worker's result bytes as the response, as they are (the common binary case)."""
        try:
            out, hlen = binary_response(target.spec.name, target.spec.version, oip.id, h.outputs, payload)
        except (TensorError, KeyError) as e:
            raise RequestFailed(f"worker sent a malformed result: {e}", 502) from None
        return out, _binary_headers(hlen, rid)

    @staticmethod
    def _answer(
        target: Target, oip: InferRequest, answer_id: str | None, rid: str, outputs: dict[str, np.ndarray]
    ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        spec = target.spec
        out, hlen = encode_infer_response(spec.name, spec.version, answer_id, outputs, oip.outputs, oip.binary_output)
        if hlen is None:
            return out, [*_JSON, _rid_header(rid)]
        return out, _binary_headers(hlen, rid)

    async def _infer(self, req: DirectRequest, who: Principal, target: Target, t0: float) -> None:
        headers = req.headers
        body = req.body
        enc, hl = headers.get(b"content-encoding"), _header_length(headers)
        if enc is None and (len(body) if hl is None else hl) <= BIG_JSON:  # decoded here: most are small
            oip = parse_infer_request(body, hl, self.limits.max_body_size)
        else:
            oip = await self._decode_large(body, enc, hl)
        arrays, deadline, priority, told, rid = self._bind(oip, target, headers, t0)
        tr = None if self.tracing is None else self.begin_trace(headers.get(b"traceparent"), target, t0)
        try:
            pool = target.pool
            if pool is not None and oip.outputs is None and oip.binary_output and self.results is None:
                h, payload = await self.service.call_model(
                    pool, arrays, deadline, None, rid, raw=True, priority=priority, trace=tr, told=told
                )
                req.respond(200, *self._binary_answer(target, oip, rid, h, payload))
            else:
                names = [o.name for o in oip.outputs] if oip.outputs is not None else None
                if pool is not None:
                    outputs = await self.service.call_model(
                        pool, arrays, deadline, names, rid, priority=priority, trace=tr, told=told
                    )
                else:
                    assert target.pipeline is not None
                    outputs = await self.service.run_pipeline(
                        target.pipeline, arrays, deadline, rid, priority=priority, trace=tr, told=told
                    )
                if oip.outputs is not None:
                    outputs = classified(oip, target.spec, outputs)
                # With result storage the answer carries rid: the device can fetch the stored result later.
                answer_id = oip.id if self.results is None else rid
                if oip.binary_output or _nbytes(outputs) <= BIG_JSON:
                    answer = self._answer(target, oip, answer_id, rid, outputs)
                else:  # a large JSON answer is written on a thread, as large requests are read
                    async with self._big_decodes:
                        answer = await asyncio.to_thread(self._answer, target, oip, answer_id, rid, outputs)
                if self.results is not None:
                    self.record(target, 200, t0, rid, who, arrays, outputs)
                req.respond(200, *answer)
        except RequestFailed as e:
            self.record(target, e.status, t0, rid, who, arrays, None, e)
            req.respond(*self._failure(e, rid))
            if tr is not None:
                tr.end(e.status, rid, time.monotonic())
            return
        except asyncio.CancelledError:
            if not req.client_left:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            self.metrics.observe_response(target.spec, 499, time.monotonic() - t0)
            if tr is not None:
                tr.end(499, rid, time.monotonic())
            return
        if tr is not None:
            tr.end(200, rid, time.monotonic())
        self.metrics.observe_response(target.spec, 200, time.monotonic() - t0)

    def _body_limit(self, headers: dict[bytes, bytes]) -> int:
        """The most body bytes a request may send; ``ProtocolError`` 413 at once when its
        ``Content-Length`` says more."""
        limit = self.limits.max_body_size
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                raise ProtocolError("bad Content-Length") from None
            if n > limit:
                raise ProtocolError(f"body of {n} bytes exceeds the {limit} byte limit", 413)
        return limit

    async def _read_body(self, headers: dict[bytes, bytes], receive: Any) -> bytes:
        limit = self._body_limit(headers)
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

    async def _decode_large(self, body: bytes, enc: bytes | None, hl: int | None) -> InferRequest:
        """A large or compressed body, decompressed and parsed on a thread (a few at a time)."""
        async with self._big_decodes:
            encoding = enc.decode("latin-1") if enc is not None else None
            return await asyncio.to_thread(self._decode_now, body, encoding, hl)

    def _decode_now(self, body: bytes, encoding: str | None, hl: int | None) -> InferRequest:
        limit = self.limits.max_body_size
        if encoding is not None:
            try:
                body = decompress(body, encoding, limit)
            except CompressionError as e:
                raise ProtocolError(str(e), e.status) from None
        return parse_infer_request(body, hl, limit)

    def charge(self, who: Principal, now: float) -> None:
        """One request against the caller's quota: ``RequestFailed`` 429, with when to try again, when
        it is over its rate."""
        assert self.quotas is not None
        wait = self.quotas.check(who.role, who.who, now)
        if wait > 0.0:
            self.metrics.quota_refused.labels(who.role).inc()
            ms = max(1, math.ceil(wait * 1000.0))
            raise RequestFailed(
                f"over this credential's rate limit ({who.who}); try again in {ms} ms", 429, -(-ms // 1000), ms
            )

    def begin_trace(self, traceparent: bytes | str | None, target: Target, t0: float) -> RequestTrace | None:
        """The request's trace (tracing is on): continuing the device's ``traceparent``, if it sent
        one; None when this request is not recorded."""
        assert self.tracing is not None
        if isinstance(traceparent, bytes):
            traceparent = traceparent.decode("latin-1")
        return self.tracing.begin(traceparent, target.spec.name, t0)

    def budget(self, params: dict[str, Any], headers: dict[bytes, bytes]) -> tuple[float, int]:
        """The request's time budget in seconds (the gateway's ``--timeout``, shortened by the
        request's own ``timeout_ms``, Triton's ``timeout`` or ``X-Request-Timeout-Ms``) and its
        ``priority`` (the parameter, else ``X-Request-Priority``; 0: the model's default). gRPC's
        front asks the same of a call's parameters (its headers: none; its deadline it applies)."""
        budget = self.limits.request_timeout_s
        priority = 0
        if params:
            ms = request_timeout_ms(params)
            if ms is not None:
                budget = min(budget, ms / 1000.0)
            priority = request_priority(params)
        raw = headers.get(TIMEOUT_HEADER)
        if raw is not None and (ms := header_number(raw, "X-Request-Timeout-Ms", 1 << 31)) > 0:
            budget = min(budget, ms / 1000.0)
        raw = headers.get(PRIORITY_HEADER)
        if raw is not None and priority == 0:
            priority = header_number(raw, "X-Request-Priority", MAX_PRIORITY)
        return budget, priority

    def _request_id(self, headers: dict[bytes, bytes]) -> str:
        """For a request without an ``id``: its ``X-Request-Id``, else a new one (it goes to the
        worker, the logs and the answer)."""
        xrid = headers.get(b"x-request-id")
        if xrid is None:
            return self.service.new_request_id()
        xs = xrid.decode("latin-1")
        if not valid_request_id(xs):
            raise ProtocolError("X-Request-Id must be 1 to 256 printable ASCII characters")
        return xs

    def record(
        self,
        target: Target,
        status: int,
        t0: float,
        rid: str,
        who: Principal,
        arrays: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray] | None,
        error: RequestFailed | None = None,
    ) -> None:
        """A failed request's metrics and log line, and either answer stored when storage is on."""
        if error is not None:
            self.metrics.observe_response(target.spec, status, time.monotonic() - t0)
            self._log_failure(target, rid, error)
        if self.results is not None:
            why = str(error) if error is not None else None
            record_request(self.results, rid, target.spec, arrays, outputs, status, t0, who.who, why)

    @staticmethod
    def _log_failure(target: Target, rid: str, error: RequestFailed) -> None:
        if error.status >= 500:
            model = target.spec.name
            log.warning("request %s to %s failed: %s", rid, model, error, extra={"request_id": rid, "model": model})

    # ------------------------------------------------------------------------- repository

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
                ready = doc.get("ready", False)
                if not isinstance(ready, bool):
                    raise ProtocolError("'ready' must be true or false")
                rows = self.repository.index(ready)
                await _reply(send, 200, orjson.dumps(rows))
                return
            if target is not None and target[1] is not None:
                action, name = target
                await (self.repository.load if action == "load" else self.repository.unload)(name)
                await _reply(send, 200, b"{}")
                return
        except RepositoryError as e:
            raise ProtocolError(str(e), e.status) from None
        await _reply(send, 404, error_body(f"no such endpoint: {method} {path}"))

    async def _fail(self, send: Any, e: ProtocolError | RequestFailed, rid: str | None = None) -> None:
        await _reply(send, *self._failure(e, rid))

    def _failure(
        self, e: ProtocolError | RequestFailed, rid: str | None = None
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """A failed request's answer (status, body, headers), counted."""
        extra = [*_JSON]
        if isinstance(e, RequestFailed) and e.retry_after is not None:
            extra.append((b"retry-after", str(e.retry_after).encode()))
            if e.retry_after_ms is not None:
                extra.append((b"retry-after-ms", str(e.retry_after_ms).encode()))
        if rid:
            extra.append(_rid_header(rid))
        self.metrics.http_errors.labels(str(e.status)).inc()
        return e.status, error_body(str(e)), extra


def _header_length(headers: dict[bytes, bytes]) -> int | None:
    """Inference-Header-Content-Length: the JSON part's length (None: all JSON; 0: a raw body)."""
    raw = headers.get(_HEADER_LENGTH)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        raise ProtocolError("Inference-Header-Content-Length must be an integer") from None


def check_outputs(req: InferRequest, target: Target) -> None:
    assert req.outputs is not None
    known = {o.name: o.datatype for o in target.spec.outputs}
    for o in req.outputs:
        if o.name not in known:
            raise ProtocolError(f"unknown output '{o.name}'; the model's outputs are {', '.join(known)}")
        if o.classification and known[o.name] == "BYTES":
            raise ProtocolError(f"output '{o.name}' is BYTES: classification needs a numeric output")


def classified(req: InferRequest, spec: ModelInterface, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The outputs asked for as classes replaced by their top k (the classification extension)."""
    counts = class_counts(req.outputs)
    if not counts:
        return outputs
    try:
        # Per row when the model batches (Triton's rule); a pipeline's outputs per row too (one per
        # fanned-out crop, say), though it does not batch as a whole.
        return classify(outputs, counts, spec.max_batch_size > 0 or spec.runtime == "pipeline", spec.labels)
    except ClassificationError as e:
        raise ProtocolError(str(e)) from None


def _binary_headers(hlen: int, rid: str) -> list[tuple[bytes, bytes]]:
    return [*_BINARY, (b"inference-header-content-length", b"%d" % hlen), _rid_header(rid)]


def _decoded(raw: str) -> str:
    """A path as the client sent it, percent-decoded (for messages)."""
    return unquote(raw) if "%" in raw else raw


def _rid_header(rid: str) -> tuple[bytes, bytes]:
    return (b"x-request-id", rid.encode("latin-1", "replace"))


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
