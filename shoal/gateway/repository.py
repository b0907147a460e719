"""Model management: Triton's repository extension over the gateway's engine.

``POST /v2/repository/index`` lists the models of the engine's repository and the versions this
gateway serves, each with a state (``READY``: a live worker; ``ASLEEP``: none, one is started for the
first request; ``LOADING``: workers starting; ``UNAVAILABLE``: unloaded or not started, with the
reason). ``POST /v2/repository/models/{m}/load`` makes the engine serve ``m`` (its policy from the
gateway's configuration, else at least one worker) and answers once a worker is ready;
``.../unload`` drains its workers, answers once they have left, and refuses its requests from then on.
Operator credentials only (the HTTP app checks them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shoal.modelrepo.manifest import ManifestError, list_versions
from shoal.protocol.names import InvalidName, check_name

if TYPE_CHECKING:
    from shoal.gateway.server import Gateway


class RepositoryError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def index(gw: Gateway, ready_only: bool = False) -> list[dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    scaler = gw.autoscaler
    if scaler is not None:
        import os

        for name in sorted(os.listdir(scaler.repo)) if os.path.isdir(scaler.repo) else []:
            for v in list_versions(scaler.repo, name):
                out[(name, v)] = {"name": name, "version": v, "state": "UNAVAILABLE", "reason": "not loaded"}
        for m in scaler.managed.values():
            state = scaler.state(m)
            reason = "" if state in ("READY", "ASLEEP") else (m.unavailable or m.last_error or m.reason)
            out[(m.name, m.version)] = {"name": m.name, "version": m.version, "state": state, "reason": reason}
    for pool in gw.models.pools():
        key = (pool.spec.name, pool.spec.version)
        if key in out and out[key]["state"] != "UNAVAILABLE":
            continue
        if pool.ready:
            out[key] = {"name": key[0], "version": key[1], "state": "READY", "reason": ""}
        elif key not in out:
            why = "unloaded" if pool.unloaded else "no live worker"
            out[key] = {"name": key[0], "version": key[1], "state": "UNAVAILABLE", "reason": why}
    rows = sorted(out.values(), key=lambda r: (r["name"], r["version"]))
    return [r for r in rows if r["state"] == "READY"] if ready_only else rows


def _scaler(gw: Gateway) -> Any:
    if gw.autoscaler is None:
        raise RepositoryError(
            "model management needs an engine to start workers: configure the gateway's autoscale "
            "block (engine local, ray or kubernetes)",
            400,
        )
    if gw.autoscaler.engine.external:
        raise RepositoryError(
            "workers are started by the cluster's autoscaler (engine kubernetes): scale the model's "
            "worker Deployment instead",
            400,
        )
    return gw.autoscaler


def _check(name: str) -> None:
    try:
        check_name(name)
    except InvalidName as e:
        raise RepositoryError(str(e), 400) from None


async def load(gw: Gateway, name: str) -> None:
    _check(name)
    scaler = _scaler(gw)
    if not scaler.find(name):
        try:
            gw.manage_model(name)
        except (ManifestError, ValueError) as e:
            raise RepositoryError(str(e), 404) from None
    from shoal.autoscale.controller import LoadFailed

    try:
        await scaler.load(name)
    except LoadFailed as e:  # as Triton answers a model that fails to load
        raise RepositoryError(str(e), 400) from None
    except TimeoutError as e:
        raise RepositoryError(str(e), 503) from None


async def unload(gw: Gateway, name: str) -> None:
    _check(name)
    scaler = _scaler(gw)
    if not scaler.find(name):
        raise RepositoryError(f"model '{name}' is not loaded by this gateway's engine", 404)
    try:
        await scaler.unload(name)
    except TimeoutError as e:
        raise RepositoryError(str(e), 503) from None
