"""The webhook: every interval, central POSTs its status (``WebhookPost``) to another server.

A post runs beside the server and never delays a route; a post still running when the next is due
is skipped (and counted); failures are counted and logged without the URL's credentials.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Callable

import httpx
import msgspec

import shoal
from shoal.central.db import Store
from shoal.protocol.central_messages import AckedCommand, WebhookPost, WebhookState

log = logging.getLogger("shoal.central")


class Webhook:
    def __init__(
        self,
        url: str | None,
        interval_s: float,
        timeout_s: float,
        status: Callable[[list[AckedCommand]], WebhookPost],
        store: Store,
    ) -> None:
        self.url = url
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.status = status
        self.store = store
        self.sent = 0
        self.failed = 0
        self.skipped = 0
        self.last_error: str | None = None
        self.last_ok_at: float | None = None

    def state(self) -> WebhookState:
        return WebhookState(
            bool(self.url), self.sent, self.failed, self.skipped, self.last_error, self.last_ok_at
        )

    async def run(self) -> None:
        if not self.url:
            return
        target = urllib.parse.urlsplit(self.url)
        where = f"{target.scheme}://{target.hostname}:{target.port or ''}{target.path}"  # no secrets in logs
        headers = {"content-type": "application/json", "user-agent": f"shoal-central/{shoal.__version__}"}
        since = time.time()
        pending: asyncio.Task | None = None
        async with httpx.AsyncClient(timeout=self.timeout_s, headers=headers, trust_env=False) as client:

            async def post(body: bytes, now: float) -> None:
                nonlocal since
                try:
                    r = await client.post(self.url or "", content=body)
                    if r.status_code >= 400:
                        raise OSError(f"HTTP {r.status_code}")  # not httpx's message: it holds the URL
                    self.sent += 1
                    self.last_ok_at = time.time()
                    since = now
                except Exception as e:
                    self.failed += 1
                    self.last_error = str(e)[:200] or type(e).__name__
                    log.warning("webhook %s failed (%d so far): %s", where, self.failed, self.last_error)

            try:
                while True:
                    await asyncio.sleep(self.interval_s)
                    if pending is not None and not pending.done():
                        self.skipped += 1
                        continue
                    try:
                        now = time.time()
                        body = msgspec.json.encode(self.status(await self.store.acked_since(since)))
                    except Exception as e:
                        self.failed += 1
                        self.last_error = f"building the status failed: {e}"
                        continue
                    # The post runs on its own, so a slow endpoint delays only the next post.
                    pending = asyncio.create_task(post(body, now), name="webhook-post")
            finally:
                if pending is not None:
                    pending.cancel()
