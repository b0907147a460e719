"""The measurement behind the gateway's HTTP stack: the same tiny endpoint (read a small POST body,
answer 40 bytes of JSON) on each candidate server, one process pinned to one core, loaded with 64
keep-alive clients from the other core. Run as ``python -m shoal.bench.http_stacks STACK PORT`` to
serve, or through ``shoal bench http-stacks``."""

from __future__ import annotations

import sys

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


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
