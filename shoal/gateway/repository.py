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

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shoal.modelrepo.manifest import ManifestError, list_versions
from shoal.protocol.names import InvalidName, check_name

if TYPE_CHECKING:
    from shoal.autoscale.controller import Autoscaler
    from shoal.gateway.pool import ModelTable


class RepositoryError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RepositoryApi:
    """The repository extension over the parts it needs: the pools (what is served), the autoscaler
    (what its engine can start), and the gateway's way to put a model of the repository under it."""

    def __init__(self, models: ModelTable, scaler: Autoscaler | None, manage: Callable[[str], None]) -> None:
        self.models = models
        self.scaler = scaler
        self.manage = manage

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        out: dict[tuple[str, str], dict[str, Any]] = {}
        scaler = self.scaler
        if scaler is not None:
            for name in sorted(os.listdir(scaler.repo)) if os.path.isdir(scaler.repo) else []:
                try:
                    versions = list_versions(scaler.repo, name)
                except ManifestError:  # a folder whose name is no model name
                    continue
                for v in versions:
                    out[(name, v)] = {"name": name, "version": v, "state": "UNAVAILABLE", "reason": "not loaded"}
            for m in scaler.managed.values():
                state = scaler.state(m)
                reason = "" if state in ("READY", "ASLEEP") else (m.unavailable or m.last_error or m.reason)
                out[(m.name, m.version)] = {"name": m.name, "version": m.version, "state": state, "reason": reason}
        for pool in self.models.pools():
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

    def _scaler(self) -> Autoscaler:
        if self.scaler is None:
            raise RepositoryError(
                "model management needs an engine to start workers: configure the gateway's autoscale "
                "block (engine local, ray or kubernetes)",
                400,
            )
        if self.scaler.engine.external:
            raise RepositoryError(
                "workers are started by the cluster's autoscaler (engine kubernetes): scale the model's "
                "worker Deployment instead",
                400,
            )
        return self.scaler

    async def load(self, name: str) -> None:
        from shoal.autoscale.controller import LoadFailed

        _check(name)
        scaler = self._scaler()
        if not scaler.find(name):
            try:
                self.manage(name)
            except (ManifestError, ValueError) as e:
                raise RepositoryError(str(e), 404) from None
        try:
            await scaler.load(name)
        except LoadFailed as e:  # as Triton answers a model that fails to load
            raise RepositoryError(str(e), 400) from None
        except TimeoutError as e:
            raise RepositoryError(str(e), 503) from None

    async def unload(self, name: str) -> None:
        _check(name)
        scaler = self._scaler()
        if not scaler.find(name):
            raise RepositoryError(f"model '{name}' is not loaded by this gateway's engine", 404)
        try:
            await scaler.unload(name)
        except TimeoutError as e:
            raise RepositoryError(str(e), 503) from None


def _check(name: str) -> None:
    try:
        check_name(name)
    except InvalidName as e:
        raise RepositoryError(str(e), 400) from None
