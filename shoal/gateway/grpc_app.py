"""The gateway's gRPC face: the Open Inference Protocol's ``inference.GRPCInferenceService`` (as
``tritonclient.grpc`` speaks it) on grpcio's asyncio server. An extra (``pip install shoal[grpc]``):
the composition root starts it only when grpcio is importable.

One request path: every call goes through the HTTP app's pieces (credentials and roles, the request
service, metrics, result storage, model and readiness views, the repository API), so gRPC and HTTP
check, queue, batch, run, count and store requests alike. Only the transport differs:
``grpc_tensors`` converts the messages, this file maps outcomes to gRPC status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from shoal.gateway.auth import AuthError, Principal
from shoal.gateway.grpc_tensors import (
    infer_request,
    infer_response,
    model_config_response,
    model_metadata,
    model_statistics,
    raw_infer_response,
)
from shoal.gateway.http_app import Forbidden, HttpApp, check_outputs, classified
from shoal.gateway.pool import RequestFailed
from shoal.gateway.repository import RepositoryError
from shoal.protocol.names import InvalidName, check_name
from shoal.protocol.oip import PathRoute, ProtocolError, bind_inputs, class_counts
from shoal.protocol.oip_grpc import grpc_service_pb2 as pb
from shoal.protocol.oip_grpc.grpc_service_pb2_grpc import (
    GRPCInferenceServiceServicer,
    add_GRPCInferenceServiceServicer_to_server,
)
from shoal.protocol.tensors import TensorError

log = logging.getLogger("shoal.gateway")
SC = grpc.StatusCode
# HTTP statuses (what the shared pieces raise) as gRPC status codes.
_CODES = {
    400: SC.INVALID_ARGUMENT,
    401: SC.UNAUTHENTICATED,
    403: SC.PERMISSION_DENIED,
    404: SC.NOT_FOUND,
    405: SC.UNIMPLEMENTED,
    408: SC.DEADLINE_EXCEEDED,
    409: SC.FAILED_PRECONDITION,
    413: SC.RESOURCE_EXHAUSTED,
    429: SC.RESOURCE_EXHAUSTED,
    499: SC.CANCELLED,
    501: SC.UNIMPLEMENTED,
    503: SC.UNAVAILABLE,
    504: SC.DEADLINE_EXCEEDED,
}


class CallFailed(Exception):
    """One call's outcome as a gRPC status: aborts a unary call, becomes a stream's error_message."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_ms = retry_after_ms  # overloaded or over a rate limit: when to try again


def _failed(app: HttpApp, e: Exception) -> CallFailed:
    """One of the shared pieces' exceptions as ``CallFailed`` with the matching code, counted as HTTP
    counts it; any other exception as it is (re-raised by the caller)."""
    if isinstance(e, Forbidden):
        app.metrics.auth_refused.labels("403").inc()
        return CallFailed(SC.PERMISSION_DENIED, str(e))
    if isinstance(e, (ProtocolError, RequestFailed, RepositoryError)):
        app.metrics.http_errors.labels(str(e.status)).inc()
        ms = e.retry_after_ms if isinstance(e, RequestFailed) else None
        return CallFailed(_CODES.get(e.status, SC.INTERNAL), str(e), ms)
    assert isinstance(e, InvalidName)
    return CallFailed(SC.INVALID_ARGUMENT, str(e))


# What the shared pieces raise for a refused request; ``_failed`` maps each to its status.
_REFUSALS = (Forbidden, ProtocolError, RequestFailed, RepositoryError, InvalidName)


@contextlib.contextmanager
def _outcome(app: HttpApp) -> Iterator[None]:
    """``_failed`` around a block (the calls that are not on the request path's hot loop)."""
    try:
        yield
    except _REFUSALS as e:
        raise _failed(app, e) from None


def _credentials(context: grpc.aio.ServicerContext) -> tuple[bytes | None, str | None]:
    """The call's ``authorization`` (as bytes, as HTTP's header) and W3C ``traceparent`` metadata, in
    one pass over it (the first of each, as HTTP takes the first header)."""
    authz = traceparent = None
    for k, v in context.invocation_metadata() or ():
        if k == "authorization":
            if authz is None:
                authz = v.encode("latin-1") if isinstance(v, str) else v
        elif k == "traceparent" and traceparent is None:
            traceparent = v if isinstance(v, str) else v.decode("latin-1")
    return authz, traceparent


def _target_names(model: str, version: str) -> tuple[str, str | None]:
    return check_name(model, "model name"), (check_name(version, "model version") if version else None)


class GrpcFront(GRPCInferenceServiceServicer):
    def __init__(self, app: HttpApp) -> None:
        self.app = app
        self.service = app.service

    # ------------------------------------------------------------------------ credentials

    def _who(self, context: grpc.aio.ServicerContext, authz: bytes | None = None) -> Principal:
        """The caller, from the call's ``authorization`` (``authz`` when already read, else the
        call's metadata)."""
        if authz is None:
            authz = _credentials(context)[0]
        try:
            return self.app.auth.principal(authz)
        except AuthError as e:
            self.app.metrics.auth_refused.labels("401").inc()
            raise CallFailed(SC.UNAUTHENTICATED, str(e)) from None

    async def _call(
        self, context: grpc.aio.ServicerContext, action: str, model: str = "", version: str = ""
    ) -> tuple[Principal, str, str | None]:
        """The caller, allowed ``action`` on the model named (its name and version checked)."""
        try:
            who = self._who(context)
            with _outcome(self.app):
                name, ver = _target_names(model, version) if model else ("", None)
                self.app.check(who, action, name or None, ver)
        except CallFailed as e:
            await context.abort(e.code, str(e))
        return who, name, ver

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, e: CallFailed) -> Any:
        if e.retry_after_ms is not None:
            await context.abort(e.code, str(e), (("retry-after-ms", str(e.retry_after_ms)),))
        await context.abort(e.code, str(e))

    # ----------------------------------------------------------------- health and metadata

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        await self._call(context, "server")
        return pb.ServerReadyResponse(ready=self.app.models.all_ready())

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        await self._call(context, "server")
        doc = self.app.views.server_metadata()
        return pb.ServerMetadataResponse(
            name=doc["name"], version=doc["version"], extensions=doc["extensions"]
        )

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        doc = await self._model_view(context, "model_ready", request)
        return pb.ModelReadyResponse(ready=bool(doc["ready"]))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        return model_metadata(await self._model_view(context, "model", request))

    async def _model_view(self, context: Any, kind: str, request: Any) -> dict[str, Any]:
        """What HTTP's GET of the model's ``kind`` route answers (its document, whatever the status)."""
        _, name, ver = await self._call(context, "model", request.name, request.version)
        try:
            with _outcome(self.app):
                _, doc = await self.app.gets[kind](PathRoute(kind, name, ver))
        except CallFailed as e:
            await self._abort(context, e)
        return doc

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return model_config_response(await self._model_view(context, "config", request))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        """One model's statistics (a version's, or every version's), or every model's (no name)."""
        if not request.name:
            await self._call(context, "all_stats")
            _, doc = await self.app.gets["stats"](PathRoute("stats"))
            return model_statistics(doc)
        return model_statistics(await self._model_view(context, "stats", request))

    # ---------------------------------------------------------------------------- infer

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        try:
            authz, traceparent = _credentials(context)
            who = self._who(context, authz)
            return await self._infer(who, request, context.time_remaining(), traceparent)
        except CallFailed as e:
            return await self._abort(context, e)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request of the stream runs as it arrives (several at once, batched with everyone's);
        answers come back as they finish, a failed one as its ``error_message``."""
        try:
            authz, traceparent = _credentials(context)
            who = self._who(context, authz)
        except CallFailed as e:
            await self._abort(context, e)
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def one(req: pb.ModelInferRequest) -> None:
            try:
                msg = pb.ModelStreamInferResponse(
                    infer_response=await self._infer(who, req, context.time_remaining(), traceparent)
                )
            except CallFailed as e:
                failed = pb.ModelInferResponse(
                    model_name=req.model_name, model_version=req.model_version, id=req.id
                )
                msg = pb.ModelStreamInferResponse(error_message=str(e), infer_response=failed)
            answers.put_nowait(msg)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    t = asyncio.create_task(one(req))
                    running.add(t)
                    t.add_done_callback(running.discard)
                while running:
                    await asyncio.gather(*list(running))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (msg := await answers.get()) is not None:
                yield msg
            await reader  # a reading error (the client's stream broken) ends the call with it
        finally:
            for t in [reader, *running]:
                t.cancel()

    async def _infer(
        self, who: Principal, req: pb.ModelInferRequest, left_s: float | None, traceparent: str | None = None
    ) -> pb.ModelInferResponse:
        """One request, step by step as HTTP's: where it goes, its tensors checked against the model,
        its deadline and id, the call through the request service, the answer."""
        t0 = time.monotonic()
        app = self.app
        try:  # the shared pieces' refusals as gRPC statuses (inline: this is every call's path)
            name, ver = _target_names(req.model_name, req.model_version)
            app.check(who, "infer", name, ver)
            if app.quotas is not None:
                app.charge(who, t0)
            target = self.service.target(name, ver)
            ireq = infer_request(req, app.limits.max_body_size)
            spec = target.spec
            arrays = bind_inputs(ireq, spec.inputs, spec.image_input, spec.max_batch_size)
            if ireq.outputs is not None:
                check_outputs(ireq, target)
            budget, priority = app.budget(ireq.parameters, {})
            if left_s is not None:  # the call's own deadline
                budget = min(budget, left_s)
            told = budget < app.limits.request_timeout_s
            rid = ireq.id or self.service.new_request_id()
            answer_id = (ireq.id or "") if app.results is None else rid
            names = [o.name for o in ireq.outputs] if ireq.outputs is not None else None
            tr = None if app.tracing is None else app.begin_trace(traceparent, target, t0)
            try:
                if target.pool is not None and app.results is None and not class_counts(ireq.outputs):
                    # Common case: the worker's result bytes become the raw contents as they are.
                    h, payload = await self.service.call_model(
                        target.pool,
                        arrays,
                        t0 + budget,
                        names,
                        rid,
                        raw=True,
                        priority=priority,
                        trace=tr,
                        told=told,
                    )
                    try:
                        resp = raw_infer_response(spec.name, spec.version, answer_id, h.outputs, payload)
                    except (TensorError, KeyError) as e:
                        raise RequestFailed(f"worker sent a malformed result: {e}", 502) from None
                else:
                    if target.pool is not None:
                        outputs = await self.service.call_model(
                            target.pool,
                            arrays,
                            t0 + budget,
                            names,
                            rid,
                            priority=priority,
                            trace=tr,
                            told=told,
                        )
                    else:
                        assert target.pipeline is not None
                        outputs = await self.service.run_pipeline(
                            target.pipeline, arrays, t0 + budget, rid, priority=priority, trace=tr, told=told
                        )
                    if ireq.outputs is not None:
                        outputs = classified(ireq, spec, outputs)
                    if app.results is not None:
                        app.record(target, 200, t0, rid, who, arrays, outputs)
                    resp = infer_response(spec.name, spec.version, answer_id, outputs)
            except RequestFailed as e:
                app.record(target, e.status, t0, rid, who, arrays, None, e)
                if tr is not None:
                    tr.end(e.status, rid, time.monotonic())
                raise
            except asyncio.CancelledError:  # the caller cancelled its call
                if tr is not None:
                    tr.end(499, rid, time.monotonic())
                raise
        except _REFUSALS as e:
            raise _failed(app, e) from None
        if tr is not None:
            tr.end(200, rid, time.monotonic())
        app.metrics.observe_response(spec, 200, time.monotonic() - t0)
        return resp

    # ------------------------------------------------------------------------- repository

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        await self._call(context, "repository")
        rows = self.app.repository.index(request.ready)
        Index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                Index(name=r["name"], version=str(r["version"]), state=r["state"], reason=r["reason"])
                for r in rows
            ]
        )

    async def RepositoryModelLoad(self, request: Any, context: Any) -> pb.RepositoryModelLoadResponse:
        await self._manage(context, self.app.repository.load, request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> pb.RepositoryModelUnloadResponse:
        await self._manage(context, self.app.repository.unload, request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def _manage(self, context: Any, action: Callable[[str], Awaitable[None]], name: str) -> None:
        await self._call(context, "repository")
        try:
            with _outcome(self.app):
                await action(name)
        except CallFailed as e:
            await self._abort(context, e)


# Room for a request's envelope around the largest body HTTP takes.
_ENVELOPE = 64 * 1024


class GrpcServer:
    """grpcio's asyncio server holding the front, on its own port (TLS with the gateway's pair)."""

    def __init__(
        self,
        front: GrpcFront,
        host: str,
        port: int,
        max_receive: int,
        max_send: int,
        tls: tuple[str, str] | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.front, self.host, self.port = front, host, port
        options = [
            ("grpc.max_receive_message_length", max_receive + _ENVELOPE),
            ("grpc.max_send_message_length", max_send + _ENVELOPE),
            # grpcio shares ports by default: two gateways on one port must fail, not split its calls.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
        self.server = grpc.aio.server(options=options)
        add_GRPCInferenceServiceServicer_to_server(front, self.server)
        self.tls = tls

    async def start(self) -> int:
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            if self.tls is not None:
                cert, key = (Path(p).read_bytes() for p in self.tls)
                bound = self.server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
            else:
                bound = self.server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot serve gRPC on {address}: {e}") from None
        if not bound:
            raise OSError(f"cannot serve gRPC on {address} (in use?)")
        self.port = bound
        await self.server.start()
        return bound

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace_s)
