"""The gateway's HTTP API to stored results (``shoal cluster --store-results``).

``GET /v2/results`` lists them (filters: model, version, since, until, status, request_id; newest
first, ``limit`` at most 1000, paging with ``before`` = the last ``id`` seen), ``GET
/v2/results/{request_id}`` answers one with its outputs as JSON, and ``.../inputs/{name}`` and
``.../outputs/{name}`` answer a stored file's bytes. Not on the inference hot path; authorised by the
HTTP app like every other endpoint.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from shoal.protocol.oip import error_body

if TYPE_CHECKING:
    import numpy as np

    from shoal.gateway.auth import Principal
    from shoal.gateway.pool import ModelSpec
    from shoal.gateway.server import Gateway, GatewayConfig
    from shoal.gateway.storage import ResultStore

PREFIX = "/v2/results"
_LIST_PARAMS = ("model", "version", "since", "until", "status", "limit", "before", "request_id")
_TYPES = {
    ".npy": b"application/octet-stream",
    ".png": b"image/png",
    ".jpg": b"image/jpeg",
    ".gif": b"image/gif",
    ".webp": b"image/webp",
}


class BadQuery(ValueError):
    pass


def record_request(
    store: ResultStore,
    rid: str,
    spec: ModelSpec,
    inputs: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray] | None,
    status: int,
    t0: float,
    who: str,
    error: str | None = None,
) -> None:
    """Hand one answered inference request to the store (called by the HTTP app only when it is on)."""
    store.record(
        rid,
        spec.name,
        spec.version,
        inputs,
        None,
        outputs,
        status,
        (time.monotonic() - t0) * 1000.0,
        error,
        who,
    )


def open_store(cfg: GatewayConfig) -> ResultStore | None:
    """The gateway's result store, or None when storage is off. Imports the database layer only
    when it is on; a URL it cannot use is a ValueError, as for any other bad setting."""
    if not cfg.results_db:
        return None
    try:
        from shoal.gateway.storage import ResultStore
    except ImportError as e:
        raise ValueError(
            f"result storage needs SQLAlchemy and a database driver: pip install 'shoal[storage]' ({e})"
        ) from None
    return ResultStore(
        cfg.results_db,
        Path(cfg.results_dir),
        cfg.results_max_age_s,
        cfg.results_max_bytes,
        cluster=cfg.name,
    )


async def handle_results(
    gw: Gateway, who: Principal, check: Any, method: str, path: str, query: bytes, send: Any
) -> bool:
    """Answer ``path`` if it is under /v2/results; False (nothing sent) for any other path.

    ``check(who, action)`` raises when the caller may not: listing needs the operator role; one
    result (and its files) may be read by an operator or by the device that sent the request. A
    device asking for another's result is told it does not exist, so ids cannot be probed."""
    if path != PREFIX and not path.startswith(PREFIX + "/"):
        return False
    parts = [p for p in path[len(PREFIX) :].split("/") if p]
    check(who, "result" if parts else "results")
    store = gw.results
    if store is None:
        await _reply(
            send,
            404,
            error_body("result storage is off on this cluster (start it with --store-results DB_URL)"),
        )
        return True
    if method != "GET":
        await _reply(send, 405, error_body(f"{path} takes GET"))
        return True
    owner = None if who.role == "operator" else who.who
    try:
        if not parts:
            rows = await store.list(**_list_args(query))
            await _reply(send, 200, orjson.dumps(rows))
        elif len(parts) == 1:
            got = await store.get(parts[0])
            if got is None or (owner is not None and got.get("client") != owner):
                await _reply(send, 404, error_body(f"no stored result with request id '{parts[0]}'"))
            else:
                await _reply(send, 200, orjson.dumps(got))
        elif len(parts) == 3 and parts[1] in ("inputs", "outputs"):
            kind = parts[1][:-1]
            found = await store.payload_file(parts[0], kind, parts[2], owner)
            if found is None:
                await _reply(
                    send,
                    404,
                    error_body(
                        f"request '{parts[0]}' has no stored {kind} '{parts[2]}' (see /v2/results/{parts[0]})"
                    ),
                )
            else:
                name, data = found
                ctype = _TYPES.get(name[name.rfind(".") :], b"application/octet-stream")
                disp = f'attachment; filename="{name}"'.encode()
                await _reply(send, 200, data, [(b"content-type", ctype), (b"content-disposition", disp)])
        else:
            await _reply(send, 404, error_body(f"no such endpoint: {method} {path}"))
    except BadQuery as e:
        await _reply(send, 400, error_body(str(e)))
    except Exception as e:  # the database or the folder failed: say so, never crash the app
        store.count_error("cannot read stored results", e)
        await _reply(send, 503, error_body(f"result storage unavailable: {type(e).__name__}"))
    return True


def _list_args(query: bytes) -> dict[str, Any]:
    try:
        q = {k: v[-1] for k, v in parse_qs(query.decode("latin-1"), strict_parsing=False).items()}
    except ValueError as e:
        raise BadQuery(f"malformed query string: {e}") from None
    unknown = sorted(set(q) - set(_LIST_PARAMS))
    if unknown:
        raise BadQuery(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(_LIST_PARAMS)}")
    args: dict[str, Any] = {}
    for k in ("model", "version", "request_id"):
        if k in q:
            args[k] = q[k]
    for k in ("since", "until"):
        if k in q:
            args[k] = parse_time(q[k], k)
    for k, dest in (("status", "status"), ("limit", "limit"), ("before", "before_id")):
        if k in q:
            try:
                args[dest] = int(q[k])
            except ValueError:
                raise BadQuery(f"'{k}' must be an integer, got {q[k]!r}") from None
    if "limit" in args and not 1 <= args["limit"] <= 1000:
        raise BadQuery("'limit' must be between 1 and 1000")
    return args


def parse_time(value: str, what: str = "time") -> float:
    """Unix seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadQuery(
            f"'{what}' must be unix seconds or an ISO 8601 time such as 2026-11-25T14:00:00Z, got {value!r}"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


async def _reply(
    send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = headers or [(b"content-type", b"application/json")]
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
