"""The measurement behind the gateway's HTTP stack: the same tiny endpoint (read a small POST body,
answer 40 bytes of JSON) on each candidate server, one process pinned to one core, loaded with 64
keep-alive clients from the other core. Run as ``python -m shoal.bench.http_stacks STACK PORT`` to
serve, or through ``shoal bench http-stacks``."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

from shoal.bench.loadgen import LoadGenerator, http_request
from shoal.bench.process import CPU_CLIENT, CPU_SERVER, pin_self, two_cores, unpin_self

ANSWER = b'{"model_name":"echo","outputs":[1,2,3]}'


async def raw_asgi(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    msg = await receive()
    while msg.get("more_body"):
        msg = await receive()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(ANSWER)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": ANSWER})


def starlette_app():  # type: ignore[no-untyped-def]
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def infer(request):  # type: ignore[no-untyped-def]
        await request.body()
        return Response(ANSWER, media_type="application/json")

    return Starlette(routes=[Route("/v2/models/{m}/infer", infer, methods=["POST"])])


def serve(stack: str, port: int) -> None:
    if stack == "aiohttp":
        from aiohttp import web

        async def infer(request):  # type: ignore[no-untyped-def]
            await request.read()
            return web.Response(body=ANSWER, content_type="application/json")

        app = web.Application()
        app.router.add_post("/v2/models/{m}/infer", infer)
        import uvloop

        uvloop.install()
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
        return
    import uvicorn

    app = raw_asgi if stack == "raw-asgi" else starlette_app()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        http="httptools",
        loop="uvloop",
        access_log=False,
        log_level="warning",
    )


def http_stacks(workdir: Path, args: Namespace) -> dict[str, Any]:
    """Requests/s of the same tiny endpoint on each HTTP server stack, one core each, 64 clients."""
    out: dict[str, Any] = {}
    pinned = two_cores()
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1],"data":[1]}]}'
    req = http_request("/v2/models/echo/infer", body, {"Content-Type": "application/json"})
    for stack, needs in (("raw-asgi", "uvicorn"), ("starlette", "starlette"), ("aiohttp", "aiohttp")):
        if importlib.util.find_spec(needs) is None:
            out[stack] = f"skipped: {needs} is not installed"
            continue
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "shoal.bench.http_stacks", stack, str(port)]
        if pinned:
            cmd = ["taskset", "-c", str(CPU_SERVER), *cmd]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            end = time.monotonic() + 15
            while time.monotonic() < end:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            if pinned:
                pin_self(CPU_CLIENT)
            gen = LoadGenerator("127.0.0.1", port, lambda i: req, args.connections, duration_s=1.0)
            asyncio.run(gen.run())
            gen = LoadGenerator(
                "127.0.0.1", port, lambda i: req, args.connections, duration_s=args.seconds / 2
            )
            res = asyncio.run(gen.run())
            out[f"{stack}, requests/s on one core"] = round(res.rps)
        finally:
            unpin_self()
            proc.terminate()
            proc.wait(10)
    return out


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
