"""Central's own cost per route, without the network: the ASGI application called directly (no
sockets, no HTTP parsing), CPU time per ``POST /v1/route`` with warm Basic credentials and with a
session token, best of five rounds. Steadier than routes/s on a machine that does other work. Also
what signing and verifying one route token costs (``shoal.security.tokens``).

Run as a script (``python central_app.py``) with the shoal to measure first on ``PYTHONPATH``: it
imports only ``shoal.central.server``, so ``shoal bench central --baseline DIR`` measures an older
tree's central the same way. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
import time
from typing import Any

ROUNDS = 5
PER_ROUND = 2000


async def main() -> dict[str, float]:
    from shoal.central.server import Central, CentralConfig

    folder = tempfile.mkdtemp(prefix="shoal-central-app-")
    config = CentralConfig(
        http_port=0,
        db_url=f"sqlite:///{folder}/central.db",
        bootstrap_operator=("bench", "operator-password"),
        startup_grace_s=0,
    )
    central = Central(config)
    await central.start()
    app: Any = getattr(central, "app", central)  # a Starlette app, or (before it) Central itself

    async def call(method: str, path: str, body: bytes, auth: str) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []
        headers = [(b"host", b"central"), (b"content-type", b"application/json")]
        headers += [(b"content-length", str(len(body)).encode()), (b"authorization", auth.encode())]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 7000),
            "state": {},
        }
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return sent[0]["status"], sent[1]["body"]

    def basic(name: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()

    operator = basic("bench", "operator-password")
    for kind, name in (("cluster", "site"), ("device", "cam")):
        account = {"kind": kind, "name": name, "password": "bench-password"}
        assert (await call("POST", "/v1/accounts", json.dumps(account).encode(), operator))[0] == 201
    report = b'{"address":"http://127.0.0.1:9000","models":[{"name":"m","version":"1","capacity":64}]}'
    device = basic("cam", "bench-password")
    session = "Bearer " + json.loads((await call("POST", "/v1/login", b"", device))[1])["token"]
    out = {}
    for label, auth in (("basic_cpu_us", device), ("session_cpu_us", session)):
        best = float("inf")
        for _ in range(ROUNDS):
            await call("POST", "/v1/clusters/report", report, basic("site", "bench-password"))
            t = time.process_time()
            for _ in range(PER_ROUND):
                status, _ = await call("POST", "/v1/route", b'{"model":"m"}', auth)
            best = min(best, (time.process_time() - t) / PER_ROUND * 1e6)
            assert status == 200, status
        out[label] = round(best, 1)
    await central.stop()
    out.update(token_cost())
    return out


def token_cost() -> dict[str, float]:
    from shoal.security.tokens import sign_token, verify_token

    key = b"k" * 32
    claims = {"aud": "site", "sub": "cam", "model": "m"}
    token = sign_token(claims, key, 300)
    out = {}
    for label, fn in (
        ("token_sign_us", lambda: sign_token(claims, key, 300)),
        ("token_verify_us", lambda: verify_token(token, key, audience="site")),
    ):
        best = float("inf")
        for _ in range(ROUNDS):
            t = time.process_time()
            for _ in range(PER_ROUND):
                fn()
            best = min(best, (time.process_time() - t) / PER_ROUND * 1e6)
        out[label] = round(best, 1)
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
