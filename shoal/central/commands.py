"""Commands operators post for devices, and the long poll devices collect them with.

Commands live in the database, so any replica may store one and any replica may deliver it. A device
waiting here is woken at once by a command stored here, and within ``poll_s`` by one another replica
stored (a poller looks for new ids while anyone waits).
"""

from __future__ import annotations

import asyncio
import logging
import time

from shoal.central.db import Store
from shoal.protocol.central_messages import Command

log = logging.getLogger("shoal.central")
RECHECK_S = 5.0


class CommandRelay:
    def __init__(self, store: Store, poll_s: float) -> None:
        self.store = store
        self.poll_s = poll_s
        self.stopping = False
        self._waiters: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}
        self._last_id = 0

    async def start(self) -> None:
        self._last_id = await self.store.last_command_id()

    def stop_waiting(self) -> None:
        """Shutting down: every long poll answers now with what it has."""
        self.stopping = True
        for ev in self._waiters.values():
            ev.set()

    async def add(self, device: str, command: str, args: dict, by: str) -> int:
        cid = await self.store.add_command(device, command, args, by)
        ev = self._waiters.get(device)
        if ev is not None:
            ev.set()
        return cid

    async def wait(self, device: str, wait_s: float) -> list[Command]:
        """The device's unacknowledged commands; waits up to ``wait_s`` for one when there are none."""
        deadline = time.monotonic() + wait_s
        self._waiting[device] = self._waiting.get(device, 0) + 1
        try:
            while True:
                ev = self._waiters.setdefault(device, asyncio.Event())
                ev.clear()
                cmds = await self.store.pending_commands(device)
                left = deadline - time.monotonic()
                if cmds or left <= 0 or self.stopping:
                    return cmds
                try:
                    # Re-check now and then even without a wake-up: ids from other replicas may commit
                    # out of order, and the poller only looks past the highest id it saw.
                    await asyncio.wait_for(ev.wait(), timeout=min(left, RECHECK_S))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._waiting[device] -= 1
            if self._waiting[device] == 0:
                del self._waiting[device]
                self._waiters.pop(device, None)

    async def run_poller(self) -> None:
        # Commands may be stored by any replica: look for new ones while devices are waiting here.
        while True:
            await asyncio.sleep(self.poll_s)
            if not self._waiters:
                continue
            try:
                rows = await self.store.commands_since(self._last_id)
            except Exception as e:  # the database may be briefly unreachable; try again next tick
                log.warning("looking for new commands failed: %s", e)
                continue
            for cid, device in rows:
                self._last_id = max(self._last_id, cid)
                ev = self._waiters.get(device)
                if ev is not None:
                    ev.set()
