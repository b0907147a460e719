"""The device's own model, and the flow that places each request on it, on the cluster, or on both.

    from shoal.client import Client
    c = Client(central, "cam-7", pw, local="models/mnist-mlp/1", policy="cascade")
    r = c.infer("mnist-cnn", frame=camera_frame)      # numpy uint8 [H, W] or [H, W, 3]
    r.where, r.timings_ms, r.bytes_up, r.fallback      # "local" | "remote" | "split", ...

* ``LocalModel``: a model repository version folder (``manifest.json`` + ONNX file) run by ONNX
  Runtime on one thread; raw frames and encoded images become its input as the manifest's ``image``
  block says, exactly as a worker prepares them in the cluster.
* ``encode_frame``: a raw frame as JPEG (lossy, ``quality`` 1-95) or PNG (lossless) bytes, which the
  cluster decodes with the same manifest block; tensors keep travelling zstd-compressed.
* ``Edge.infer``: the flow. What runs where is decided by the pure functions of ``placement.py``; this
  module measures (local time, encoding, round trips against upload size, failures) and carries the
  decision out. Like the rest of the client it does no I/O itself: it yields ``Call``/``Sleep`` for
  the network and ``Compute`` for the processor, and the blocking or asyncio driver runs them.

``pip install 'shoal[edge]'`` adds what this needs: ONNX Runtime and Pillow.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from shoal.client import placement as pl
from shoal.client.core import (
    RETRY_STATUSES,
    TRACEPARENT_HEADER,
    Call,
    ClientCore,
    Compute,
    Finished,
    Flow,
    InferError,
    InferResult,
    Race,
    RouteError,
    Sleep,
    Unreachable,
    resume,
)
from shoal.modelrepo.manifest import ImageSpec, Manifest, load_manifest

FRAME_FORMATS = ("jpeg", "png")
DEFAULT_QUALITY = 90
# Largest raw frame accepted: the 40 MP the cluster's decoder allows (shoal/runtime/images.py).
MAX_FRAME_PIXELS = 40_000_000
EDGE_EXTRA = "pip install 'shoal[edge]'"
T = TypeVar("T")


class EdgeError(ValueError):
    """A local model that cannot be used, or a frame that cannot be sent; the message says why."""


# ------------------------------------------------------------------------------------- frames


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise EdgeError(f"raw frames need Pillow: {EDGE_EXTRA}") from None
    return Image


def check_frame(frame: Any) -> np.ndarray:
    """A camera frame: uint8 [H, W] (grey), [H, W, 3] (RGB) or [H, W, 4] (RGBA)."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise EdgeError("a frame must be a numpy uint8 array [H, W], [H, W, 3] or [H, W, 4]")
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] not in (3, 4)) or 0 in frame.shape:
        raise EdgeError(f"a frame must be [H, W], [H, W, 3] or [H, W, 4], not {list(frame.shape)}")
    if frame.shape[0] * frame.shape[1] > MAX_FRAME_PIXELS:
        raise EdgeError(f"a frame of {frame.shape[1]}x{frame.shape[0]} exceeds {MAX_FRAME_PIXELS} pixels")
    return np.ascontiguousarray(frame)


def check_encoding(fmt: str, quality: int) -> None:
    if fmt not in FRAME_FORMATS:
        raise EdgeError(f"frame format must be one of {', '.join(FRAME_FORMATS)}, not {fmt!r}")
    if not 1 <= int(quality) <= 95:
        raise EdgeError(f"JPEG quality must be 1-95, not {quality}")


def encode_frame(frame: np.ndarray, fmt: str = "jpeg", quality: int = DEFAULT_QUALITY) -> bytes:
    """The frame as JPEG (``quality`` 1-95; Pillow's default chroma subsampling) or PNG (lossless,
    zlib level 6; ``quality`` unused) bytes."""
    check_encoding(fmt, quality)
    im = _pil().fromarray(check_frame(frame))
    buf = io.BytesIO()
    if fmt == "jpeg":
        im = im.convert("RGB") if im.mode == "RGBA" else im
        im.save(buf, "JPEG", quality=int(quality))
    else:
        im.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def frame_tensor(frame: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """A raw frame -> the model's input for one image, as the cluster turns the same frame, sent as
    PNG, into it (``shoal.runtime.images.decode_image``: Pillow's mode conversion and bilinear resize,
    then scale, mean, std and layout)."""
    Image = _pil()
    im = Image.fromarray(check_frame(frame)).convert(spec.mode)
    if im.size != tuple(spec.size):
        im = im.resize(tuple(spec.size), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = (arr * np.float32(spec.scale) - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


# -------------------------------------------------------------------------------- local model


class LocalModel:
    """One model version from a model repository folder, run on this device by ONNX Runtime on one
    thread (a device's cores are few, and the rest of the program needs one)."""

    def __init__(self, version_dir: str | Path, threads: int = 1) -> None:
        from shoal.runtime.runtimes import OnnxRuntime, RuntimeError_

        self.dir = Path(version_dir)
        self.manifest: Manifest = load_manifest(self.dir)
        if self.manifest.runtime != "onnx":
            raise EdgeError(f"{self.dir}: a device runs ONNX models; this one is '{self.manifest.runtime}'")
        try:
            self._runtime = OnnxRuntime(self.dir, self.manifest, "cpu", threads)
        except ImportError:
            raise EdgeError(f"a local model needs ONNX Runtime: {EDGE_EXTRA}") from None
        except RuntimeError_ as e:
            raise EdgeError(f"{self.dir}: {e}") from None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def prepare(
        self,
        inputs: dict[str, np.ndarray] | None = None,
        image: bytes | None = None,
        frame: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """The model's input dict (a batch of one for an image or a frame)."""
        if inputs is not None:
            want = {t.name for t in self.manifest.inputs}
            if set(inputs) != want:
                raise EdgeError(f"local model {self.name} takes inputs {sorted(want)}, not {sorted(inputs)}")
            return inputs
        spec = self.manifest.image
        if spec is None:
            raise EdgeError(f"local model {self.name} has no image block in its manifest: give it tensors")
        if frame is not None:
            x = frame_tensor(frame, spec)
        else:
            from shoal.runtime.images import ImageError, decode_image

            try:
                x = decode_image(image or b"", spec)
            except ImageError as e:
                raise EdgeError(str(e)) from None
        return {spec.input: x[None]}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._runtime.infer(inputs)

    def confidence(self, outputs: dict[str, np.ndarray]) -> float:
        """Top-class probability of the first output (softmax of logits; probabilities as they are)."""
        y = np.asarray(outputs[self._runtime.output_names[0]], np.float64).reshape(-1)
        if y.size == 0:
            return 0.0
        if not (np.all(y >= 0) and abs(float(y.sum()) - 1.0) < 1e-3):
            y = np.exp(y - y.max())
            y /= y.sum()
        return float(y.max())

    def timed_warm_up(self) -> float:
        """Run once on zeros (ONNX Runtime's first run allocates); the second run's milliseconds."""
        feed = {
            t.name: np.zeros([1 if d < 0 else d for d in t.shape], np.float32) for t in self.manifest.inputs
        }
        self.run(feed)
        t0 = time.perf_counter()
        self.run(feed)
        return (time.perf_counter() - t0) * 1000.0


def open_local(local: str | Path | LocalModel | None) -> LocalModel | None:
    return local if isinstance(local, LocalModel) or local is None else LocalModel(local)


# ------------------------------------------------------------------------------------- deadline


class DeadlinePassed(Unreachable):
    """The cluster did not answer within the time the policy gave it."""


def within(flow: Flow[Any], deadline: float, clock: Callable[[], float] = time.monotonic) -> Flow[Any]:
    """Run ``flow`` with every exchange's timeout cut to what is left before ``deadline``; past it,
    ``DeadlinePassed``."""
    outcome: Any = None
    while True:
        step = resume(flow, outcome)
        if isinstance(step, Finished):
            return step.value
        left = deadline - clock()
        if left <= 0 or (isinstance(step, Sleep) and step.seconds >= left):
            flow.close()
            raise DeadlinePassed(f"no answer from the cluster within the deadline ({left:+.3f} s left)")
        if isinstance(step, Call):
            step = replace(step, timeout=min(step.timeout or left, left))
        elif isinstance(step, Race):
            step = Race(tuple(replace(c, timeout=min(c.timeout or left, left)) for c in step.calls))
        try:
            outcome = yield step
        except Unreachable as e:
            outcome = e


def _fallback_worthy(e: Exception) -> bool:
    """Failures the device answers itself after (link or cluster unavailable), as opposed to its own
    mistakes (a bad input, wrong credentials), which are raised."""
    if isinstance(e, Unreachable):
        return True
    if isinstance(e, InferError):
        return e.status in RETRY_STATUSES
    return isinstance(e, RouteError) and e.retryable


# ------------------------------------------------------------------------------------------ flow


class Edge:
    """A client's local model, its default policy and what it has measured."""

    def __init__(
        self,
        core: ClientCore | None,
        local: str | Path | LocalModel | None = None,
        policy: str = "remote",
        threshold: float = 0.9,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if policy not in pl.POLICIES:
            raise pl.PlacementError(f"unknown policy '{policy}'; choose one of {', '.join(pl.POLICIES)}")
        if not 0.0 <= threshold <= 1.0:
            raise pl.PlacementError(f"the cascade threshold is a probability (0-1), not {threshold}")
        self.core = core
        self.local = open_local(local)
        if policy in ("local", "cascade", "split") and self.local is None:
            raise pl.PlacementError(f"policy '{policy}' needs a local model (local=MODEL_DIR)")
        self.policy = policy
        self.threshold = threshold
        self.clock = clock
        self.measured = pl.Measured(link_since=clock())
        if self.local is not None:
            self.measured = pl.observe_local(self.measured, self.local.timed_warm_up())

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray] | None = None,
        image: bytes | None = None,
        frame: np.ndarray | None = None,
        version: str | None = None,
        policy: str | None = None,
        budget_ms: float | None = None,
        frame_format: str = "jpeg",
        quality: int = DEFAULT_QUALITY,
        traceparent: str | None = None,
    ) -> Flow[InferResult]:
        policy = policy or self.policy
        if sum(x is not None for x in (inputs, image, frame)) != 1:
            raise ValueError("give exactly one of inputs (arrays), image (encoded bytes) or frame (raw array)")
        if frame is not None:
            frame = check_frame(frame)
            check_encoding(frame_format, quality)
        if budget_ms is not None and budget_ms <= 0:
            raise pl.PlacementError(f"a latency budget is a positive number of milliseconds, not {budget_ms}")
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        req = pl.Request(
            policy,
            self._upload_size(inputs, image, frame),
            encode=frame is not None,
            budget_ms=budget_ms,
            has_local=self.local is not None,
        )
        d = pl.decide(req, self.measured, self.clock())
        if d.probe and (yield from self._probe(model, version)) is not None:
            d = pl.decide(req, self.measured, self.clock())  # the link's state is known again
        if d.run != "local" and self.core is None:
            raise pl.PlacementError(f"policy '{policy}' needs a cluster: give the client a central URL")
        outputs: dict[str, np.ndarray] | None = None
        if d.run in ("local", "cascade", "split"):
            outputs = yield from self._run_local(inputs, image, frame, timings)
        if d.run == "local":
            return self._local_result(outputs, policy, timings, t0, d.fallback, budget_ms)
        if d.run == "split":
            assert self.core is not None
            body, headers = self.core.infer_body(outputs, None)
            r = yield from self._remote(model, version, body, headers, None, timings, traceparent)
            return self._finish(r, "split", policy, timings, t0, budget_ms)
        if d.run == "cascade":
            spent = (time.perf_counter() - t0) * 1000.0
            confidence = self.local.confidence(outputs)
            d = pl.escalate(req, self.measured, confidence, self.threshold, spent, self.clock())
            if d.probe and (yield from self._probe(model, version)) is not None:
                d = pl.escalate(req, self.measured, confidence, self.threshold, spent, self.clock())
            if d.run == "local":
                return self._local_result(outputs, policy, timings, t0, d.fallback, budget_ms)
        # The cluster, with a deadline (and the local model to fall back on) under fastest and cascade.
        try:
            if frame is not None:
                image = yield from self._encode(frame, frame_format, quality, timings)
            assert self.core is not None
            body, headers = self.core.infer_body(inputs, image)
            r = yield from self._remote(model, version, body, headers, d.deadline_s, timings, traceparent)
        except Exception as e:
            if d.deadline_s is None or self.local is None or not _fallback_worthy(e):
                raise
            if outputs is None:
                outputs = yield from self._run_local(inputs, image if frame is None else None, frame, timings)
            why = f"cluster failed ({str(e)[:160]}): answered locally"
            return self._local_result(outputs, policy, timings, t0, why, budget_ms)
        return self._finish(r, "remote", policy, timings, t0, budget_ms)

    # ------------------------------------------------------------------------------ the parts

    def _upload_size(self, inputs: Any, image: bytes | None, frame: np.ndarray | None) -> int | None:
        if image is not None:
            return len(image)
        if frame is not None:
            return pl.expected_upload(self.measured, frame.nbytes)
        return sum(np.asarray(v).nbytes for v in inputs.values())

    def _probe(self, model: str, version: str | None) -> Flow[bool | None]:
        """Is the cluster reachable again? A liveness check on the last route, bounded in time; None
        when there is no route to check (the request itself will try)."""
        core = self.core
        route = None if core is None else core.routes.get((model, version)) or core.last_routes.get((model, version))
        if route is None:
            return None
        try:
            reply = yield Call("GET", route.url + "/v2/health/live", None, {}, pl.probe_timeout_s(self.measured))
            ok = reply.status == 200
        except Unreachable:
            ok = False
        now = self.clock()
        self.measured = pl.observe_link_up(self.measured, now) if ok else pl.observe_failure(self.measured, now)
        return ok

    def _run_local(
        self, inputs: Any, image: bytes | None, frame: np.ndarray | None, timings: dict[str, float]
    ) -> Flow[dict[str, np.ndarray]]:
        local = self.local
        assert local is not None

        def work() -> tuple[dict[str, np.ndarray], float]:
            t = time.perf_counter()
            out = local.run(local.prepare(inputs, image, frame))
            return out, (time.perf_counter() - t) * 1000.0

        outputs, ms = yield Compute(work)
        timings["local"] = ms
        self.measured = pl.observe_local(self.measured, ms)
        return outputs

    def _encode(self, frame: np.ndarray, fmt: str, quality: int, timings: dict[str, float]) -> Flow[bytes]:
        def work() -> tuple[bytes, float]:
            t = time.perf_counter()
            data = encode_frame(frame, fmt, quality)
            return data, (time.perf_counter() - t) * 1000.0

        data, ms = yield Compute(work)
        timings["encode"] = ms
        self.measured = pl.observe_encoding(self.measured, frame.nbytes, len(data), ms)
        return data

    def _remote(
        self,
        model: str,
        version: str | None,
        body: bytes,
        headers: dict[str, str],
        deadline_s: float | None,
        timings: dict[str, float],
        traceparent: str | None = None,
    ) -> Flow[InferResult]:
        assert self.core is not None
        if traceparent:
            headers = {**headers, TRACEPARENT_HEADER: traceparent}
        t = time.perf_counter()
        flow = self.core.send_infer(model, body, headers, version, retries=0 if deadline_s is not None else None)
        if deadline_s is not None:
            flow = within(flow, time.monotonic() + deadline_s)
        try:
            r = yield from flow
        except Exception as e:
            if _fallback_worthy(e):
                self.measured = pl.observe_failure(self.measured, self.clock())
            raise
        # The infer exchange alone (not the route or labels fetched before it, nor earlier attempts) is
        # the round trip; what came before it in this flow is routing.
        timings["remote"] = r.latency_ms
        timings["routing"] = max(0.0, (time.perf_counter() - t) * 1000.0 - r.latency_ms)
        self.measured = pl.observe_remote(self.measured, len(body), r.latency_ms, self.clock())
        route = self.core.routes.get((model, version))
        if route is not None:
            self.measured = pl.observe_cluster_latency(self.measured, route.latency_ms)
        return r

    def _finish(
        self, r: InferResult, where: str, policy: str, timings: dict[str, float], t0: float, budget_ms: float | None
    ) -> InferResult:
        timings["total"] = (time.perf_counter() - t0) * 1000.0
        r.where, r.policy, r.timings_ms = where, policy, timings
        r.latency_ms = timings["total"]
        return _over_budget(r, budget_ms)

    def _local_result(
        self,
        outputs: dict[str, np.ndarray] | None,
        policy: str,
        timings: dict[str, float],
        t0: float,
        fallback: str | None,
        budget_ms: float | None = None,
    ) -> InferResult:
        local = self.local
        assert local is not None and outputs is not None
        timings["total"] = (time.perf_counter() - t0) * 1000.0
        r = InferResult(
            outputs,
            local.name,
            local.version,
            "device",
            timings["total"],
            dict(local.manifest.labels),
            where="local",
            policy=policy,
            bytes_up=0,
            timings_ms=timings,
            fallback=fallback,
        )
        return _over_budget(r, budget_ms)


def _over_budget(r: InferResult, budget_ms: float | None) -> InferResult:
    """A request that took longer than its budget says so (in ``fallback``): the budget was not kept,
    whatever the policy chose."""
    if budget_ms is not None and r.latency_ms > budget_ms:
        over = f"over the {budget_ms:g} ms budget ({r.latency_ms:.1f} ms)"
        r.fallback = f"{r.fallback}; {over}" if r.fallback else over
    return r


def run_offline(flow: Flow[T]) -> T:
    """Drive a flow that needs no network (the ``local`` policy without a cluster)."""
    outcome: Any = None
    while not isinstance(step := resume(flow, outcome), Finished):
        if not isinstance(step, Compute):
            raise pl.PlacementError("this request needs the network, and there is no cluster to ask")
        outcome = step.fn()
    return step.value
