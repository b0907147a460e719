"""What a gateway knows of its cluster's other gateways: who takes the autoscaling decisions (exactly
one at a time), the load each of the others carries (the decider scales on the cluster's load, not
its own share of it), and the operators' model loads and unloads made on any of them (applied by
all, the newest per model winning).

Two channels carry it, chosen by where the gateways run:

* **central** (``--central``: gateways on several machines): each report says whether the gateway
  wants to decide; central keeps a lease per cluster in its database, shared by its replicas, and
  each answer names the holder and every live gateway of the cluster with its load. A gateway that
  stops reporting loses the lease within about three report intervals.
* **a folder** on one machine (the gateways' shared state folder, as ``--processes`` runs them):
  each gateway writes its record there every second and reads the others'; the decider holds an
  exclusive ``flock`` on the folder's lock file, which the kernel releases the moment its process
  dies, so another takes over at its next try (a second at most).

A gateway that knows of no other gateway decides alone, as a lone gateway always did; one that
reports to central waits for central's first answer (at most a lease's length) before it does, so a
gateway joining a running cluster does not start workers the decider already runs. A gateway whose
channel has gone quiet for a lease's length stops deciding (the lease may be another's by then);
while central is unreachable, a cluster of several gateways makes no scaling decision.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shoal.protocol.central_messages import ReportAnswer

log = logging.getLogger("shoal.gateway")

RECORD_FRESH_S = 3.0  # a folder record older than this is a gateway that has gone
# A gateway that starts beside a live one leaves the decider's lock to the others this long: more
# than the period of their rounds (the heartbeat, 1 s by default), so a survivor takes it first.
YIELD_AT_START_S = 2.5
FORGET_RECORD_S = 3600.0
MAX_RECORD_BYTES = 1 << 20


@dataclass
class Record:
    """What one gateway publishes of itself."""

    id: str
    workers: str = ""  # where workers reach it
    decider: bool = False
    models: dict[str, list[float]] = field(default_factory=dict)  # "name:version" -> [queue, in_flight]
    ops: dict[str, list[Any]] = field(default_factory=dict)  # model name -> ["load" | "unload", unix time]
    at: float = 0.0  # unix time written


class Membership:
    """The cluster as this gateway sees it; fed by a channel (a folder here, central's answers)."""

    def __init__(self, gateway_id: str) -> None:
        self.gateway_id = gateway_id
        self.decider = ""  # the id of the gateway taking the decisions ("" none known)
        self.others: dict[str, Record] = {}
        self.ops: dict[str, list[Any]] = {}  # operators' actions seen, this gateway's and others'
        self.channel = "alone"
        self.took_over_at: float | None = None
        self.lease_s = 3.0  # how long what the channel said holds
        self.heard_at: float | None = None  # monotonic time the channel last spoke
        self.started_at = time.monotonic()

    def use_central(self) -> None:
        self.channel = "central"

    def deciding(self) -> bool:
        """This gateway takes the autoscaling decisions now."""
        now = time.monotonic()
        if self.channel == "alone":
            return True
        if self.heard_at is None:  # not heard yet: decide alone only once it has waited a lease
            return now - self.started_at > self.lease_s
        fresh = now - self.heard_at < self.lease_s
        return (self.decider == self.gateway_id and fresh) or not self.others

    def heard(self) -> None:
        self.heard_at = time.monotonic()

    def from_central(self, answer: ReportAnswer) -> list[str]:
        """A report answer: the cluster's gateways, their load and actions, and the lease holder.
        Returns where every gateway takes workers."""
        others = {}
        for g in answer.gateways:
            if g.id == self.gateway_id:
                continue
            models = {f"{m.name}:{m.version}": [m.queue, m.in_flight] for m in g.models}
            ops = {o.model: [o.action, o.at] for o in g.ops}
            others[g.id] = Record(g.id, g.workers, g.decider, models, ops)
        self.others = others
        self.lease_s = max(3.0, 3 * answer.report_interval_s)
        self.heard()
        self.set_decider(answer.decider)
        return [g.workers for g in answer.gateways if g.workers]

    def set_decider(self, decider: str) -> None:
        if decider != self.decider:
            if decider == self.gateway_id:
                self.took_over_at = time.time()
                log.info("gateway %s takes the cluster's autoscaling decisions", self.gateway_id)
            elif self.decider == self.gateway_id:
                log.info(
                    "gateway %s no longer takes the autoscaling decisions (%s does)",
                    self.gateway_id,
                    decider or "none",
                )
            self.decider = decider

    def peer_load(self, name: str, version: str) -> tuple[float, float]:
        """(queue, in flight) of a model version at the cluster's other gateways."""
        key = f"{name}:{version}"
        q = f = 0.0
        for r in self.others.values():
            load = r.models.get(key)
            if load:
                q += load[0]
                f += load[1]
        return q, f

    def record_op(self, name: str, action: str) -> None:
        """An operator loaded or unloaded a model here: the others apply it too."""
        self.ops[name] = [action, time.time()]

    def new_ops(self) -> list[tuple[str, str]]:
        """Actions other gateways took that are newer than what this one has seen (and now has)."""
        out = []
        for r in self.others.values():
            for name, (action, at) in r.ops.items():
                mine = self.ops.get(name)
                if mine is None or float(at) > float(mine[1]):
                    self.ops[name] = [action, float(at)]
                    out.append((name, str(action)))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "gateway_id": self.gateway_id,
            "channel": self.channel,
            "decider": self.decider or (self.gateway_id if self.deciding() else ""),
            "deciding": self.deciding(),
            "took_over_at": self.took_over_at,  # unix time this gateway last took the decisions over
            "others": sorted(self.others),
        }


class FolderChannel:
    """Gateways on one machine, through a folder they share (see the module's docstring)."""

    def __init__(
        self,
        folder: Path,
        membership: Membership,
        wants_to_decide: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folder = folder
        self.clock = clock
        self.m = membership
        self.wants = wants_to_decide
        self._lock_fd: int | None = None
        self._first = True
        self._yield_until = 0.0  # monotonic time before which this gateway does not take the lock
        membership.channel = f"folder {folder}"

    @property
    def mine(self) -> Path:
        return self.folder / f"gateway-{self.m.gateway_id.replace('/', '_').replace(':', '_')}.json"

    def step(self, record: Record) -> None:
        """One round: take or keep the lock, publish this gateway's record, read the others'. A
        gateway that finds another alive at its first round leaves the lock to the others for
        ``YIELD_AT_START_S`` (longer than their rounds' period): one restarted after it died (by
        ``--processes``' supervisor, in half a second) would otherwise race the survivors for it, and
        the decisions could go back and forth with each crash."""
        self.folder.mkdir(parents=True, exist_ok=True)
        now = self.clock()
        if self._first:
            self._first = False
            if self._read_others(time.time()):
                self._yield_until = now + YIELD_AT_START_S
        if self.wants and self._lock_fd is None and now >= self._yield_until:
            fd = os.open(self.folder / "decider.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_fd = fd
            except OSError:
                os.close(fd)
        record.decider = self._lock_fd is not None
        record.at = time.time()
        tmp = self.mine.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)))
        os.replace(tmp, self.mine)
        others = self._read_others(time.time())
        decider = self.m.gateway_id if record.decider else ""
        if not decider:
            decider = next((r.id for r in others.values() if r.decider), "")
        self.m.others = others
        self.m.heard()
        self.m.set_decider(decider)

    def _read_others(self, now: float) -> dict[str, Record]:
        """The other gateways' fresh records (a record long stale is removed)."""
        others: dict[str, Record] = {}
        for path in self.folder.glob("gateway-*.json"):
            if path == self.mine:
                continue
            try:
                if path.stat().st_size > MAX_RECORD_BYTES:
                    continue
                r = Record(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # being replaced, or not ours
            if now - r.at > RECORD_FRESH_S:
                if now - r.at > FORGET_RECORD_S:
                    path.unlink(missing_ok=True)  # a gateway long gone
                continue
            others[r.id] = r
        return others

    def stop(self) -> None:
        """Give the lock up (another gateway takes over at its next round) and withdraw the record."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.mine.unlink(missing_ok=True)
