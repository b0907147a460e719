"""The device client: ask central for a route once, cache it, talk to the cluster directly over a
keep-alive connection, and survive cluster failures and a central outage.

    from shoal.client import Client
    c = Client("https://central:7000", device="cam-7", password="...")
    r = c.infer("mnist-cnn", image=open("digit.png", "rb").read())
    print(r.label("logits"), r.cluster, r.latency_ms)

Rules (the same for ``Client`` and ``AsyncClient``; ``_Core`` holds them, free of I/O):

* A route (cluster URL and a token signed for that cluster) is cached per model and version and
  renewed shortly before its token expires.
* The cluster cannot be reached, or answers 502/503/504: ask central for another route, excluding
  that cluster, and send again (at most ``retries`` times, with back-off doubling from 50 ms: the six
  retries of the default span the three seconds central takes to drop a dead cluster).
* The cluster answers 401 (token expired or the cluster's key rotated): ask central for a fresh route.
* Central cannot be reached: keep using the last route it gave for the model (until its token
  expires), even one whose cluster just failed, retrying it with back-off: a cluster that restarts
  while central is down is back in a second, and it is the only route there is.
* Central has no route yet (404 "no live cluster", or 503 right after central or a cluster starts):
  ask again with back-off for the same few seconds, then give up with central's message.
* Any other 4xx is the device's own mistake: raised at once with the cluster's message.

Images (PNG/JPEG bytes) are sent as they are and decoded in the cluster; tensors travel with the
binary tensor extension, compressed with zstd when larger than ``compress_above`` bytes.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np

from shoal.client.http import InferError, OipHttpClient
from shoal.protocol.compression import compress
from shoal.protocol.oip import build_infer_request, parse_infer_response

RETRY_STATUSES = (502, 503, 504)
RENEW_BEFORE_S = 10.0


class RouteError(Exception):
    """No route: central refused, knows no cluster for the model, or cannot be reached (status None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        """Worth asking again shortly: central unreachable, no live cluster yet, or overloaded."""
        return self.status in (None, 404, 502, 503, 504)


@dataclass
class Route:
    cluster: str
    url: str
    token: str
    expires_at: float
    model: str
    version: str | None


@dataclass
class InferResult:
    outputs: dict[str, np.ndarray]
    model: str
    version: str
    cluster: str
    latency_ms: float
    labels: dict[str, list[str]] = field(default_factory=dict)

    def label(self, output: str | None = None, row: int = 0) -> str | int:
        """The top class of an output (its label when the model has labels, else its index)."""
        name = output or next(iter(self.outputs))
        scores = self.outputs[name].reshape(self.outputs[name].shape[0], -1)[row]
        i = int(np.argmax(scores))
        names = self.labels.get(name)
        return names[i] if names and i < len(names) else i

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "cluster": self.cluster,
            "latency_ms": round(self.latency_ms, 2),
        }
        d["labels"] = {k: self.label(k) for k in self.outputs if k in self.labels}
        d["outputs"] = {k: v.tolist() for k, v in self.outputs.items()}
        return d


class _Core:
    """What both clients decide, without doing any I/O."""

    def __init__(
        self, central: str | list[str], device: str, password: str, retries: int, compress_above: int
    ) -> None:
        self.centrals = [central] if isinstance(central, str) else list(central)
        if not self.centrals:
            raise ValueError("give at least one central URL")
        self.auth = "Basic " + base64.b64encode(f"{device}:{password}".encode()).decode()
        self.device = device
        self.retries = retries
        self.compress_above = compress_above
        self.routes: dict[tuple[str, str | None], Route] = {}
        self.last_routes: dict[tuple[str, str | None], Route] = {}  # kept after a failure, for outages
        self.metadata: dict[
            tuple[str, str, str], dict[str, list[str]]
        ] = {}  # (cluster, model, version) -> labels

    def route_body(self, model: str, version: str | None, exclude: set[str]) -> bytes:
        body: dict[str, Any] = {"model": model}
        if version:
            body["version"] = version
        if exclude:
            body["exclude"] = sorted(exclude)
        return json.dumps(body).encode()

    def parse_route(self, status: int, data: bytes, model: str, version: str | None) -> Route:
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            doc = {}
        if status != 200:
            raise RouteError(f"central: HTTP {status}: {doc.get('error', data[:200])}", status)
        try:
            return Route(
                doc["cluster"], doc["url"].rstrip("/"), doc["token"], float(doc["expires_at"]), model, version
            )
        except (KeyError, TypeError, ValueError):
            raise RouteError("central answered a route without cluster, url, token and expires_at") from None

    def cached(self, model: str, version: str | None, exclude: set[str]) -> Route | None:
        r = self.routes.get((model, version))
        if r is None or r.cluster in exclude:
            return None
        return r

    def fresh(self, r: Route | None) -> bool:
        return r is not None and time.time() < r.expires_at - RENEW_BEFORE_S

    def remember(self, r: Route) -> None:
        self.routes[(r.model, r.version)] = r
        self.last_routes[(r.model, r.version)] = r

    def fallback(self, model: str, version: str | None) -> Route | None:
        """The route to use while central cannot be reached: the last one it gave, failed or not,
        as long as its token is valid."""
        r = self.routes.get((model, version)) or self.last_routes.get((model, version))
        return r if r is not None and time.time() < r.expires_at else None

    def route_failed(self, e: RouteError, attempt: int) -> float:
        """After central gave no route: how long to wait before asking again; raises ``e`` when
        asking again would not help or the attempts are spent."""
        if not e.retryable or attempt >= self.retries:
            raise e
        return self.backoff(attempt, None)

    def infer_body(
        self, inputs: dict[str, np.ndarray] | None, image: bytes | None
    ) -> tuple[bytes, dict[str, str]]:
        if image is not None:
            return image, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "0"}
        if not inputs:
            raise ValueError("give inputs (a dict of arrays) or image (encoded bytes)")
        body, hl = build_infer_request(inputs, binary=True, binary_output=True)
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(hl)}
        if self.compress_above and len(body) > self.compress_above:
            body = compress(body, "zstd", level=1)
            headers["Content-Encoding"] = "zstd"
        return body, headers

    @staticmethod
    def infer_path(model: str, version: str | None) -> str:
        p = f"/v2/models/{quote(model, safe='')}"
        return p + (f"/versions/{quote(version, safe='')}" if version else "") + "/infer"

    @staticmethod
    def error_message(status: int, data: bytes) -> str:
        try:
            return str(json.loads(data).get("error"))
        except (ValueError, AttributeError):
            return data[:200].decode("utf-8", "replace")

    def result(self, route: Route, headers: dict[str, str], data: bytes, t0: float) -> InferResult:
        hl = headers.get("inference-header-content-length")
        doc, outputs = parse_infer_response(data, int(hl) if hl else None)
        version = str(doc.get("model_version", route.version or ""))
        labels = self.metadata.get((route.cluster, route.model, version), {})
        return InferResult(
            outputs,
            str(doc.get("model_name", route.model)),
            version,
            route.cluster,
            (time.perf_counter() - t0) * 1000.0,
            labels,
        )

    def failed(
        self,
        r: Route,
        exclude: set[str],
        attempt: int,
        status: int = 0,
        data: bytes = b"",
        retry_after: str | None = None,
        error: Exception | None = None,
    ) -> tuple[str, float]:
        """After a failed attempt on route ``r``: what went wrong, and how long to wait before the
        next attempt. Raises ``InferError`` when another attempt would not help (the device's own
        mistake)."""
        if error is not None:
            self.forget(r, exclude)
            return f"cluster {r.cluster} unreachable: {error}", self.backoff(attempt, None)
        last = f"cluster {r.cluster}: HTTP {status}: {self.error_message(status, data)}"
        if status == 401:  # token expired, or the cluster's key changed: a fresh route
            self.routes.pop((r.model, r.version), None)
            return last, 0.0
        if status in RETRY_STATUSES:
            self.forget(r, exclude)
            return last, self.backoff(attempt, retry_after)
        raise InferError(last, status)

    def forget(self, r: Route, exclude: set[str]) -> None:
        exclude.add(r.cluster)
        self.routes.pop((r.model, r.version), None)

    @staticmethod
    def backoff(attempt: int, retry_after: str | None) -> float:
        hint = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else 0.0
        return min(2.0, max(hint if attempt else 0.0, 0.05 * (2**attempt)))


class Client:
    """Synchronous device client. One per thread."""

    def __init__(
        self,
        central: str | list[str],
        device: str,
        password: str,
        timeout: float = 10.0,
        retries: int = 6,
        ca_file: str | None = None,
        compress_above: int = 4096,
    ) -> None:
        self.core = _Core(central, device, password, retries, compress_above)
        self.timeout = timeout
        self.ca_file = ca_file
        self._central = [OipHttpClient(u, timeout=timeout, ca_file=ca_file) for u in self.core.centrals]
        self._clusters: dict[str, OipHttpClient] = {}

    def close(self) -> None:
        for c in [*self._central, *self._clusters.values()]:
            c.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def route(self, model: str, version: str | None = None, exclude: set[str] | None = None) -> Route:
        """Ask central (each replica in turn) for a route; a cached one when central is unreachable."""
        core = self.core
        exclude = exclude or set()
        cached = core.cached(model, version, exclude)
        if core.fresh(cached):
            assert cached is not None
            return cached
        body = core.route_body(model, version, exclude)
        last: Exception | None = None
        for c in self._central:
            try:
                status, _, data = c.request(
                    "POST",
                    "/v1/route",
                    body,
                    {"Authorization": core.auth, "Content-Type": "application/json"},
                )
            except (OSError, http.client.HTTPException) as e:
                last = e
                continue
            try:
                r = core.parse_route(status, data, model, version)
            except RouteError as e:
                if e.status == 404 and exclude:  # every cluster failed once: try them all again
                    return self.route(model, version, set())
                raise
            core.remember(r)
            self._labels(r)
            return r
        fb = core.fallback(model, version)
        if fb is not None:
            return fb  # central is down: the last route still works until its token expires
        raise RouteError(f"no central reachable ({last}) and no usable cached route for '{model}'")

    def _cluster(self, r: Route) -> OipHttpClient:
        c = self._clusters.get(r.url)
        if c is None:
            c = self._clusters[r.url] = OipHttpClient(r.url, timeout=self.timeout, ca_file=self.ca_file)
        c.token = r.token
        return c

    def _labels(self, r: Route) -> None:
        try:
            status, meta = self._cluster(r).get_json(f"/v2/models/{quote(r.model, safe='')}")
        except (OSError, http.client.HTTPException, ValueError):
            return
        if status == 200:
            for v in meta.get("versions", []):
                self.core.metadata[(r.cluster, r.model, v)] = (meta.get("parameters") or {}).get(
                    "labels"
                ) or {}

    def commands(self, wait_s: float = 25.0) -> list[dict[str, Any]]:
        """Management commands an operator posted for this device (long poll: waits up to ``wait_s``
        for one to arrive). Acknowledge each with ``ack`` once carried out."""
        last: Exception | None = None
        for c in self._central:
            old = c.timeout
            try:
                c.close()  # the poll needs a longer socket timeout than routes do
                c.timeout = wait_s + self.timeout
                status, _, data = c.request(
                    "GET", f"/v1/commands?wait={wait_s:g}", None, {"Authorization": self.core.auth}
                )
            except (OSError, http.client.HTTPException) as e:
                last = e
                continue
            finally:
                c.close()
                c.timeout = old
            if status != 200:
                raise RouteError(f"central: HTTP {status}: {self.core.error_message(status, data)}", status)
            return list(json.loads(data).get("commands", []))
        raise RouteError(f"no central reachable: {last}")

    def ack(self, command_id: int, result: Any = None) -> None:
        """Tell central a command was carried out (with an optional result)."""
        body = json.dumps({"result": result}).encode()
        headers = {"Authorization": self.core.auth, "Content-Type": "application/json"}
        for c in self._central:
            try:
                status, _, data = c.request("POST", f"/v1/commands/{int(command_id)}/ack", body, headers)
            except (OSError, http.client.HTTPException):
                continue
            if status != 200:
                raise RouteError(f"central: HTTP {status}: {self.core.error_message(status, data)}", status)
            return
        raise RouteError("no central reachable to acknowledge the command")

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray] | None = None,
        image: bytes | None = None,
        version: str | None = None,
    ) -> InferResult:
        core = self.core
        body, headers = core.infer_body(inputs, image)
        exclude: set[str] = set()
        last = ""
        for attempt in range(core.retries + 1):
            try:
                r = self.route(model, version, exclude)
            except RouteError as e:
                last = str(e)
                time.sleep(core.route_failed(e, attempt))
                continue
            t0 = time.perf_counter()
            try:
                status, rh, data = self._cluster(r).request(
                    "POST", core.infer_path(model, version), body, headers
                )
            except (OSError, http.client.HTTPException) as e:
                last, wait = core.failed(r, exclude, attempt, error=e)
            else:
                if status == 200:
                    return core.result(r, rh, data, t0)
                last, wait = core.failed(r, exclude, attempt, status, data, rh.get("retry-after"))
            time.sleep(wait)
        raise InferError(f"gave up after {core.retries + 1} attempts; last: {last}", 503)


class AsyncClient:
    """The asyncio twin of ``Client``: the same rules, one connection per cluster, shareable by tasks."""

    def __init__(
        self,
        central: str | list[str],
        device: str,
        password: str,
        timeout: float = 10.0,
        retries: int = 6,
        ca_file: str | None = None,
        compress_above: int = 4096,
    ) -> None:
        from shoal.client.aio_http import AsyncHttpConnection

        self._conn_cls = AsyncHttpConnection
        self.core = _Core(central, device, password, retries, compress_above)
        self.timeout = timeout
        self.ca_file = ca_file
        self._central = [
            AsyncHttpConnection(u, timeout=timeout, ca_file=ca_file, max_body=1 << 20)
            for u in self.core.centrals
        ]
        self._clusters: dict[str, Any] = {}

    async def close(self) -> None:
        for c in [*self._central, *self._clusters.values()]:
            await c.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _cluster(self, r: Route) -> Any:
        c = self._clusters.get(r.url)
        if c is None:
            c = self._clusters[r.url] = self._conn_cls(r.url, timeout=self.timeout, ca_file=self.ca_file)
        return c

    async def route(self, model: str, version: str | None = None, exclude: set[str] | None = None) -> Route:
        core = self.core
        exclude = exclude or set()
        cached = core.cached(model, version, exclude)
        if core.fresh(cached):
            assert cached is not None
            return cached
        body = core.route_body(model, version, exclude)
        last: Exception | None = None
        for c in self._central:
            try:
                status, _, data = await c.request(
                    "POST",
                    "/v1/route",
                    body,
                    {"Authorization": core.auth, "Content-Type": "application/json"},
                )
            except (OSError, asyncio.TimeoutError) as e:
                last = e
                continue
            try:
                r = core.parse_route(status, data, model, version)
            except RouteError as e:
                if e.status == 404 and exclude:  # every cluster failed once: try them all again
                    return await self.route(model, version, set())
                raise
            core.remember(r)
            await self._labels(r)
            return r
        fb = core.fallback(model, version)
        if fb is not None:
            return fb
        raise RouteError(f"no central reachable ({last}) and no usable cached route for '{model}'")

    async def _labels(self, r: Route) -> None:
        try:
            status, _, data = await self._cluster(r).request(
                "GET", f"/v2/models/{quote(r.model, safe='')}", b"", {"Authorization": f"Bearer {r.token}"}
            )
            meta = json.loads(data) if status == 200 else None
        except (OSError, asyncio.TimeoutError, ValueError):
            return
        if meta:
            for v in meta.get("versions", []):
                self.core.metadata[(r.cluster, r.model, v)] = (meta.get("parameters") or {}).get(
                    "labels"
                ) or {}

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray] | None = None,
        image: bytes | None = None,
        version: str | None = None,
    ) -> InferResult:
        core = self.core
        body, headers = core.infer_body(inputs, image)
        exclude: set[str] = set()
        last = ""
        for attempt in range(core.retries + 1):
            try:
                r = await self.route(model, version, exclude)
            except RouteError as e:
                last = str(e)
                await asyncio.sleep(core.route_failed(e, attempt))
                continue
            t0 = time.perf_counter()
            try:
                status, rh, data = await self._cluster(r).request(
                    "POST",
                    core.infer_path(model, version),
                    body,
                    {**headers, "Authorization": f"Bearer {r.token}"},
                )
            except (OSError, asyncio.TimeoutError) as e:
                last, wait = core.failed(r, exclude, attempt, error=e)
            else:
                if status == 200:
                    return core.result(r, rh, data, t0)
                last, wait = core.failed(r, exclude, attempt, status, data, rh.get("retry-after"))
            await asyncio.sleep(wait)
        raise InferError(f"gave up after {core.retries + 1} attempts; last: {last}", 503)
