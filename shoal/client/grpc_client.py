"""The Open Inference Protocol over gRPC for one gateway (``shoal infer --url grpc://HOST:8001``),
needing ``shoal[grpc]``: the same calls as ``OipHttpClient`` (metadata, tensors in, tensors out, an
encoded image as its model's one input), on grpcio's synchronous channel. Tensors travel as raw
contents, as ``tritonclient.grpc`` sends and reads them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from shoal.client.core import InferError, InferResult
from shoal.protocol.oip_grpc import grpc_service_pb2 as pb
from shoal.protocol.tensors import TensorError, from_buffer, to_buffer

_SERVICE = "/inference.GRPCInferenceService/"
# A classification count past any model's classes: the gateway then gives them all.
_ALL_CLASSES = 1 << 16
# gRPC status -> the HTTP status the rest of the client speaks (InferError.status)
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def grpc_target(url: str) -> tuple[str, bool]:
    """``grpc://host:port`` (plain) or ``grpcs://host:port`` (TLS) as a channel target and whether
    it is TLS; the port is 8001 (Triton's gRPC port) when none is given."""
    scheme, _, rest = url.partition("://")
    if scheme not in ("grpc", "grpcs") or not rest:
        raise ValueError(f"a gRPC address is grpc://HOST[:PORT] or grpcs://HOST[:PORT], not {url!r}")
    host = rest.rstrip("/")
    if not host.rsplit("]", 1)[-1].count(":"):
        host += ":8001"
    return host, scheme == "grpcs"


class OipGrpcClient:
    def __init__(
        self, url: str, token: str | None = None, timeout: float = 30.0, ca_file: str | None = None
    ) -> None:
        target, tls = grpc_target(url)
        self.url = url
        self.timeout = timeout
        self._meta: list[tuple[str, str]] = [("authorization", f"Bearer {token}")] if token else []
        if tls or ca_file:
            roots = Path(ca_file).read_bytes() if ca_file else None
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots))
        else:
            self._channel = grpc.insecure_channel(target)
        self._metadata = self._method("ModelMetadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse)
        self._config = self._method("ModelConfig", pb.ModelConfigRequest, pb.ModelConfigResponse)
        self._infer = self._method("ModelInfer", pb.ModelInferRequest, pb.ModelInferResponse)
        self._labels: dict[tuple[str, str | None], dict[str, list[str]]] = {}

    def _method(self, name: str, request: Any, response: Any) -> Any:
        return self._channel.unary_unary(
            _SERVICE + name,
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> OipGrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:  # the call's deadline is the gateway's deadline for the request too
            return method(request, timeout=self.timeout, metadata=self._meta)
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            details = e.details() or ""  # type: ignore[attr-defined]
            if code == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
                raise ConnectionError(f"{self.url}: cannot connect ({details})") from None
            status = _STATUS.get(code, 500)
            ms = dict(e.trailing_metadata() or ()).get("retry-after-ms")  # type: ignore[attr-defined]
            wait = int(ms) / 1000.0 if isinstance(ms, str) and ms.isdigit() else None
            raise InferError(f"gRPC {code.name}: {details}", status, wait) from None

    def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        """The model's metadata in the HTTP document's shape (name, versions, platform, inputs, outputs)."""
        m = self._call(self._metadata, pb.ModelMetadataRequest(name=model, version=version or ""))
        tensors = [
            [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]
            for ts in (m.inputs, m.outputs)
        ]
        return {
            "name": m.name,
            "versions": list(m.versions),
            "platform": m.platform,
            "inputs": tensors[0],
            "outputs": tensors[1],
        }

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        version: str | None = None,
        outputs: list[str] | None = None,
    ) -> dict[str, np.ndarray]:
        return self._outputs(self._call(self._infer, _request(model, inputs, version, outputs)))

    def infer_result(
        self,
        model: str,
        inputs: dict[str, np.ndarray] | None = None,
        payload: bytes | None = None,
        version: str | None = None,
        labels: dict[str, list[str]] | None = None,
    ) -> InferResult:
        """Tensors (``inputs``) or an encoded image (``payload``) as an ``InferResult`` with the fields
        the HTTP client fills: the version that answered, the bytes sent, the timings. ``labels``
        None: the model's class labels learnt from the gateway (``labels``), as HTTP's metadata gives
        them."""
        if payload is not None:
            name = self.metadata(model, version)["inputs"][0]["name"]
            inputs = {name: _one_bytes(payload)}
        req = _request(model, inputs or {}, version, None)
        t0 = time.perf_counter()
        resp = self._call(self._infer, req)
        ms = (time.perf_counter() - t0) * 1000.0
        if labels is None:
            labels = self.labels(model, version, req)
        return InferResult(
            self._outputs(resp),
            resp.model_name or model,
            resp.model_version or version or "",
            self.url,
            ms,
            labels or {},
            bytes_up=req.ByteSize(),
            timings_ms={"remote": ms, "total": ms},
            gateway=self.url,
        )

    def labels(self, model: str, version: str | None, req: pb.ModelInferRequest) -> dict[str, list[str]]:
        """The class labels of the model's outputs that have them, by output name (HTTP's metadata
        ``parameters.labels``). gRPC's metadata has no place for them: the model's configuration says
        which outputs have labels (``label_filename``), and ``req`` sent once more with those outputs'
        classification for every class (the classification extension) gives each class's label.
        Learnt once per model and version; none when the model has none."""
        key = (model, version)
        if key not in self._labels:
            try:
                config = self._call(
                    self._config, pb.ModelConfigRequest(name=model, version=version or "")
                ).config
                labelled = [o.name for o in config.output if o.label_filename]
                self._labels[key] = self._learn_labels(req, labelled) if labelled else {}
            except InferError:  # an older gateway, or refused: the answer stands, without labels
                self._labels[key] = {}
        return self._labels[key]

    def _learn_labels(self, req: pb.ModelInferRequest, outputs: list[str]) -> dict[str, list[str]]:
        ask = pb.ModelInferRequest()
        ask.CopyFrom(req)
        for name in outputs:
            o = ask.outputs.add(name=name)
            o.parameters["classification"].int64_param = _ALL_CLASSES
        resp = self._call(self._infer, ask)
        labels: dict[str, list[str]] = {}
        for t, raw in zip(resp.outputs, resp.raw_output_contents, strict=False):
            if t.name not in outputs or t.datatype != "BYTES":
                continue
            try:
                entries = from_buffer("BYTES", tuple(t.shape), raw, len(raw)).reshape(-1)
            except TensorError:
                continue
            names: dict[int, str] = {}
            for e in entries:  # "score:index:label", each class once per row
                parts = (e.decode("utf-8", "replace") if isinstance(e, bytes) else str(e)).split(":", 2)
                if len(parts) == 3 and parts[1].isdigit():
                    names.setdefault(int(parts[1]), parts[2])
            if names:
                labels[t.name] = [names.get(i, str(i)) for i in range(max(names) + 1)]
        return labels

    def infer_raw(
        self, model: str, payload: bytes, version: str | None = None, input_name: str = ""
    ) -> dict[str, np.ndarray]:
        """An encoded image (a PNG or JPEG file's bytes) as the model's one input: a BYTES tensor of one."""
        if not input_name:
            input_name = self.metadata(model, version)["inputs"][0]["name"]
        return self.infer(model, {input_name: _one_bytes(payload)}, version)

    @staticmethod
    def _outputs(resp: pb.ModelInferResponse) -> dict[str, np.ndarray]:
        if len(resp.raw_output_contents) != len(resp.outputs):
            raise InferError("the gateway sent outputs without their contents", 502)
        out = {}
        for t, raw in zip(resp.outputs, resp.raw_output_contents, strict=True):
            try:
                out[t.name] = from_buffer(t.datatype, tuple(t.shape), raw, len(raw))
            except TensorError as e:
                raise InferError(f"output '{t.name}': {e}", 502) from None
        return out


def _one_bytes(payload: bytes) -> np.ndarray:
    arr = np.empty(1, dtype=object)
    arr[0] = payload
    return arr


def _request(
    model: str, inputs: dict[str, np.ndarray], version: str | None, outputs: list[str] | None
) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version or "")
    for name, arr in inputs.items():
        dt, shape, buf = to_buffer(np.asarray(arr))
        req.inputs.append(pb.ModelInferRequest.InferInputTensor(name=name, datatype=dt, shape=shape))
        req.raw_input_contents.append(bytes(buf))
    for name in outputs or ():
        req.outputs.append(pb.ModelInferRequest.InferRequestedOutputTensor(name=name))
    return req
