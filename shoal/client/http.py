"""A small synchronous Open Inference Protocol client over one keep-alive HTTP/1.1 connection.

Standard library and numpy only, so it installs on a Raspberry Pi. Not thread-safe: one per thread.
"""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from shoal.protocol.oip import build_infer_request, parse_infer_response


class InferError(Exception):
    """The cluster answered with an error; ``status`` is the HTTP status, ``retry_after`` its hint."""

    def __init__(self, message: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class OipHttpClient:
    def __init__(
        self, base_url: str, token: str | None = None, timeout: float = 30.0, ca_file: str | None = None
    ) -> None:
        u = urlsplit(base_url)
        self.base = u.path.rstrip("/")
        self.token = token
        self.timeout = timeout
        if u.scheme == "https":
            ctx = ssl.create_default_context(cafile=ca_file)
            self._make = lambda: http.client.HTTPSConnection(
                u.hostname, u.port or 443, timeout=self.timeout, context=ctx
            )
        else:
            self._make = lambda: http.client.HTTPConnection(u.hostname, u.port or 80, timeout=self.timeout)
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> OipHttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        h = dict(headers or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        for attempt in range(2):
            fresh = self._conn is None
            if fresh:
                self._conn = self._make()
            try:
                self._conn.request(method, self.base + path, body=body, headers=h)
                r = self._conn.getresponse()
                data = r.read()
                if r.will_close:
                    self.close()
                return r.status, {k.lower(): v for k, v in r.getheaders()}, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # A keep-alive connection the server closed while idle: reconnect once.
                self.close()
                if attempt or fresh:
                    raise
            except BaseException:
                self.close()  # never reuse a connection left half-way through an exchange
                raise
        raise AssertionError("unreachable")

    def get_json(self, path: str) -> tuple[int, Any]:
        status, _, data = self.request("GET", path)
        return status, json.loads(data) if data else None

    @staticmethod
    def _model_path(model: str, version: str | None) -> str:
        p = f"/v2/models/{quote(model, safe='')}"
        if version:
            p += f"/versions/{quote(version, safe='')}"
        return p

    def _check(self, status: int, headers: dict[str, str], data: bytes) -> None:
        if status != 200:
            try:
                msg = json.loads(data).get("error", data[:200].decode("utf-8", "replace"))
            except (ValueError, AttributeError):
                msg = data[:200].decode("utf-8", "replace")
            ra = headers.get("retry-after")
            raise InferError(f"HTTP {status}: {msg}", status, float(ra) if ra else None)

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
        status, rh, data = self.request("POST", self._model_path(model, version) + "/infer", body, headers)
        self._check(status, rh, data)
        hl_out = rh.get("inference-header-content-length")
        return parse_infer_response(data, int(hl_out) if hl_out else None)[1]

    def infer_raw(self, model: str, payload: bytes, version: str | None = None) -> dict[str, np.ndarray]:
        """Send one input as the raw body (for example a PNG or JPEG file's bytes)."""
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "0"}
        status, rh, data = self.request("POST", self._model_path(model, version) + "/infer", payload, headers)
        self._check(status, rh, data)
        hl_out = rh.get("inference-header-content-length")
        return parse_infer_response(data, int(hl_out) if hl_out else None)[1]
