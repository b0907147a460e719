"""The gateway's gRPC face: the Open Inference Protocol's ``inference.GRPCInferenceService`` (as
``tritonclient.grpc`` speaks it) on grpcio. An extra (``pip install shoal[grpc]``): the composition
root starts it only when grpcio is importable.

The front's handlers are coroutines on the gateway's event loop; grpcio's synchronous server carries
the calls, each handed from its thread to the loop and waited for there (``GrpcServer``). Measured
(docs/benchmarks.md, "gRPC against HTTP"), that costs the gateway about half the CPU per call of
grpcio's asyncio server on the same loop, whose every completion crosses a poller thread and a
socket into the loop.

One request path: every call goes through the HTTP app's pieces (credentials and roles, the request
service, metrics, result storage, model and readiness views, the repository API), so gRPC and HTTP
check, queue, batch, run, count and store requests alike. Only the transport differs:
``grpc_tensors`` converts the messages, this file maps outcomes to gRPC status codes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
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
# Calls served at once: each holds one of grpcio's threads while the loop works on it (a stream, one
# more of its own to read its requests). Past this, a call is refused at once (RESOURCE_EXHAUSTED)
# instead of waiting for a thread unseen by the gateway's admission.
MAX_CALLS = 512
# grpcio's "no deadline" as seconds left (about 292 years): anything past a year is none.
_NO_DEADLINE_S = 365 * 86400.0


class _Aborted(Exception):
    """The front ended its call (``context.abort``): the status, carried to grpcio's thread."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...]) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


class _LoopContext:
    """What the front's handlers use of a call's context, on the loop: the call's metadata and deadline
    (read in grpcio's thread as the call is handed over), and ``abort``, which ends the handler with
    the status for grpcio's thread to send."""

    __slots__ = ("_metadata", "_deadline")

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._metadata = context.invocation_metadata()
        left = context.time_remaining()
        self._deadline = None if left is None or left > _NO_DEADLINE_S else time.monotonic() + left

    def invocation_metadata(self) -> Any:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        raise _Aborted(code, details, tuple(trailing_metadata))


def _end(context: grpc.ServicerContext, e: BaseException) -> None:
    """End a call as the loop's handler ended: aborted with its status, or cancelled (the caller gone)."""
    if isinstance(e, _Aborted):
        if e.trailing:
            context.set_trailing_metadata(e.trailing)
        context.abort(e.code, e.details)
    if isinstance(e, (concurrent.futures.CancelledError, asyncio.CancelledError)):
        context.abort(SC.CANCELLED, "call cancelled")
    raise e


class _Bridge:
    """The front's coroutine handlers as grpcio synchronous handlers: each call's coroutine runs on the
    gateway's loop; the thread waits for it. A call that ends early (cancelled by its caller, past its
    deadline) cancels its coroutine where it is, as grpcio's asyncio server did."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # the gateway's, set when the server starts

    def _submit(self, coro: Any, context: grpc.ServicerContext, done: Callable[[Any], None]) -> None:
        """Start ``coro`` on the loop; ``done`` gets its task when it ends. The call's ending (however it
        ends: answered, cancelled by its caller, past its deadline) cancels the task where it is."""
        loop = self.loop
        assert loop is not None
        task: list[asyncio.Task] = []

        def start() -> None:
            t = loop.create_task(coro)
            t.add_done_callback(done)
            task.append(t)

        def cancel() -> None:
            if task:
                task[0].cancel()

        def ended() -> None:  # in grpcio's thread; the loop may be closed by then (the gateway stopped)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(cancel)

        loop.call_soon_threadsafe(start)
        if not context.add_callback(ended):
            ended()

    def _next(self, box: queue.SimpleQueue[Any], context: grpc.ServicerContext) -> Any:
        """What the loop puts in ``box`` next; the call ended as unavailable if the loop has closed
        first (the gateway stopped), so that no thread of grpcio's waits for ever."""
        while True:
            try:
                return box.get(timeout=1.0)
            except queue.Empty:
                assert self.loop is not None
                if self.loop.is_closed():
                    context.abort(SC.UNAVAILABLE, "the gateway has stopped")

    def unary(self, method: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            ended: queue.SimpleQueue[asyncio.Task] = queue.SimpleQueue()
            self._submit(method(request, _LoopContext(context)), context, ended.put)
            task = self._next(ended, context)  # a done task: reading it from this thread is safe
            try:
                return task.result()
            except BaseException as e:  # noqa: BLE001 (ended as the loop's handler ended)
                _end(context, e)

        return handle

    def stream(self, method: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[[Any, Any], Iterator[Any]]:
        """A bidirectional stream: a thread of its own reads the requests into the loop's handler;
        its answers come back through a queue to grpcio's thread, which sends them."""
        done = object()

        def handle(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            loop = self.loop
            assert loop is not None
            requests: asyncio.Queue[Any] = asyncio.Queue()
            answers: queue.SimpleQueue[Any] = queue.SimpleQueue()

            async def incoming() -> AsyncIterator[Any]:
                while (item := await requests.get()) is not done:
                    if isinstance(item, BaseException):
                        raise item
                    yield item

            async def run() -> None:
                try:
                    async for msg in method(incoming(), _LoopContext(context)):
                        answers.put(msg)
                except Exception as e:  # aborted, or the stream broken: grpcio's thread ends the call
                    answers.put(e)
                    return
                except BaseException as e:  # cancelled
                    answers.put(e)
                    raise
                answers.put(done)

            def read() -> None:
                try:
                    for req in request_iterator:
                        loop.call_soon_threadsafe(requests.put_nowait, req)
                    item: Any = done
                except Exception as e:  # noqa: BLE001 (the client's stream broken: the handler's error)
                    item = e
                with contextlib.suppress(RuntimeError):  # the loop closed: the gateway has stopped
                    loop.call_soon_threadsafe(requests.put_nowait, item)

            self._submit(run(), context, lambda task: None)
            threading.Thread(target=read, name="grpc-stream-reader", daemon=True).start()
            while (item := self._next(answers, context)) is not done:
                if isinstance(item, BaseException):
                    _end(context, item)
                yield item

        return handle


class _Handlers:
    """Collects what the generated ``add_..._to_server`` registers (the method table, with each
    method's (de)serialisers), to register the same methods bridged."""

    def __init__(self) -> None:
        self.methods: dict[str, grpc.RpcMethodHandler] = {}
        self.service = ""

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, methods: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.methods = service, methods


def _unimplemented(name: str) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(SC.UNIMPLEMENTED, f"{name} is not served by this gateway (GET /v2 lists what it serves)")

    return handle


class GrpcServer:
    """grpcio's synchronous server carrying the front's calls into the gateway's loop (``_Bridge``),
    on its own port (TLS with the gateway's pair)."""

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
        self.bridge = _Bridge()
        table = _Handlers()
        add_GRPCInferenceServiceServicer_to_server(front, table)
        methods = {}
        for name, h in table.methods.items():
            if getattr(type(front), name) is getattr(GRPCInferenceServiceServicer, name):
                # Triton's extensions shoal does not serve (shared memory, trace and log settings):
                # UNIMPLEMENTED, said plainly, not the generated base's exception and traceback.
                handler = grpc.unary_unary_rpc_method_handler(
                    _unimplemented(name), h.request_deserializer, h.response_serializer
                )
            elif h.unary_unary is not None:
                handler = grpc.unary_unary_rpc_method_handler(
                    self.bridge.unary(h.unary_unary), h.request_deserializer, h.response_serializer
                )
            else:
                assert h.stream_stream is not None, f"{name}: only unary and bidirectional calls are bridged"
                handler = grpc.stream_stream_rpc_method_handler(
                    self.bridge.stream(h.stream_stream), h.request_deserializer, h.response_serializer
                )
            methods[name] = handler
        self.pool = concurrent.futures.ThreadPoolExecutor(MAX_CALLS, thread_name_prefix="grpc")
        self.server = grpc.server(self.pool, options=options, maximum_concurrent_rpcs=MAX_CALLS)
        self.server.add_registered_method_handlers(table.service, methods)
        self.tls = tls

    async def start(self) -> int:
        self.bridge.loop = asyncio.get_running_loop()
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
        self.server.start()
        return bound

    async def stop(self, grace_s: float) -> None:
        """No new calls; those running get ``grace_s`` to finish (on the loop, which stays free)."""
        stopped = self.server.stop(grace_s)
        await asyncio.to_thread(stopped.wait)
        self.pool.shutdown(wait=False, cancel_futures=True)
