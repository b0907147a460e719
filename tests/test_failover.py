"""The device client's fail-over policies (shoal/client/failover.py) as plain functions, what kind of
failure an exchange met (shoal/client/http.py's ``failure_kind``), and the drivers' ``Race``: every
call at once, the first answer winning."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from shoal.client import failover as fo
from shoal.client.core import Call, InferError, Reply, Unreachable
from shoal.client.http import arace, failure_kind, race

A, B, C = "http://a:8000", "http://b:8000", "http://c:8000"
NOW = 1000.0


def test_only_a_failure_that_says_nothing_is_there_finds_a_gateway_dead():
    assert all(fo.found_dead(k) for k in (fo.REFUSED, fo.CONNECT_TIMEOUT, fo.RESET))
    assert not fo.found_dead(fo.TIMEOUT) and not fo.found_dead("")
    req = httpx.Request("POST", A)
    kinds = {
        httpx.ConnectError("[Errno 111] Connection refused", request=req): fo.REFUSED,
        httpx.ConnectError("[Errno 113] No route to host", request=req): fo.REFUSED,
        httpx.ConnectTimeout("timed out", request=req): fo.CONNECT_TIMEOUT,
        httpx.ReadError("[Errno 104] Connection reset by peer", request=req): fo.RESET,
        httpx.RemoteProtocolError("Server disconnected without sending a response.", request=req): fo.RESET,
        httpx.WriteError("[Errno 32] Broken pipe", request=req): fo.RESET,
        httpx.ReadTimeout("timed out", request=req): fo.TIMEOUT,
        httpx.WriteTimeout("timed out", request=req): fo.TIMEOUT,
        httpx.PoolTimeout("no connection free", request=req): "",  # this client's own pool: says nothing
    }
    assert {type(e).__name__ + str(e): failure_kind(e) for e in kinds} == {
        type(e).__name__ + str(e): k for e, k in kinds.items()
    }


def test_a_silent_gateway_is_probed_once_unless_already_known_dead():
    assert fo.needs_probe(fo.TIMEOUT, A, {}, set(), NOW)
    assert fo.needs_probe("", A, {}, set(), NOW)  # a failure of unknown kind: probed, never taken for dead
    assert not fo.needs_probe(fo.REFUSED, A, {}, set(), NOW)  # dead already: nothing to ask
    assert not fo.needs_probe(fo.TIMEOUT, A, {}, {A}, NOW)  # being probed
    assert not fo.needs_probe(fo.TIMEOUT, A, {A: NOW - 1}, set(), NOW)
    assert fo.needs_probe(fo.TIMEOUT, A, {A: NOW - fo.DEAD_KEPT_S}, set(), NOW)  # the mark ran out


def test_a_first_attempt_skips_gateways_found_dead_lately_while_another_remains():
    dead = {B: NOW - 5.0, C: NOW - fo.DEAD_KEPT_S - 1}
    assert fo.gateways_to_try([A, B, C], dead, NOW, True) == ([A, C], [B])
    assert fo.gateways_to_try([B, A], dead, NOW, True) == ([A], [B])  # first in the route or not
    assert fo.gateways_to_try([B], dead, NOW, True) == ([B], [])  # none left: tried all the same
    assert fo.gateways_to_try([A, B], dead, NOW, False) == ([A, B], [])  # a later attempt tries all
    assert fo.gateways_to_try([A, B], {}, NOW, True) == ([A, B], [])


def test_replicas_are_asked_in_turn_only_while_the_first_answered_lately():
    assert fo.replicas_to_ask([A, B], {}, NOW) == ([A, B], True)
    assert fo.replicas_to_ask([A, B], {A: NOW - 1.0}, NOW) == ([A, B], False)
    assert fo.replicas_to_ask([A, B], {A: NOW - fo.HEARD_S, B: NOW}, NOW) == ([A, B], True)
    assert fo.replicas_to_ask([A], {}, NOW) == ([A], False)  # one replica: nothing to race
    assert fo.after_race([A, B, C], B, [A]) == [B, C, A]
    assert fo.after_race([A, B, C], None, [A, C]) == [B, A, C]


def _calls(*urls: str) -> tuple[Call, ...]:
    return tuple(Call("POST", u + "/v1/route", b"{}", {}, 5.0) for u in urls)


def test_a_race_answers_with_the_first_reply_and_abandons_the_rest():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a":
            time.sleep(1.0)  # the slow (or lost) replica
            return httpx.Response(200, content=b"late")
        if request.url.host == "b":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, content=b"first")

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        t = time.perf_counter()
        a, b, c = race(client, _calls(A, B, C))
        assert time.perf_counter() - t < 0.8
    assert a is None and isinstance(b, Unreachable) and b.kind == fo.REFUSED
    assert isinstance(c, Reply) and c.data == b"first"
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        out = race(client, _calls(B, B))
    assert all(isinstance(o, Unreachable) for o in out)


def test_an_async_race_cancels_the_calls_still_under_way():
    cancelled = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a":
            try:
                await asyncio.sleep(5.0)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        if request.url.host == "b":
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(200, content=request.url.host.encode())

    async def main() -> list:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            out = await arace(client, _calls(A, B, C, C))
            assert cancelled.is_set()
            return out

    a, b, c, c2 = asyncio.run(main())
    assert a is None and isinstance(b, Unreachable) and b.kind == fo.TIMEOUT
    assert isinstance(c, Reply) and c.data == b"c" and c2 is None  # one reply only, the first in order


@pytest.mark.parametrize("kind", [fo.REFUSED, ""])
def test_unreachable_keeps_its_message_and_kind(kind):
    e = Unreachable("POST http://a: refused", kind=kind)
    assert str(e) == "POST http://a: refused" and e.kind == kind and isinstance(e, OSError)


def test_a_gateway_central_names_well_after_it_was_found_dead_is_taken_as_back():
    dead = {A: NOW - fo.CENTRAL_SEES_S, B: NOW - 1.0}
    assert fo.seen_by_central(dead, [A, B, C], NOW) == [A]  # B: central may not have dropped it yet
    assert fo.seen_by_central(dead, [C], NOW) == []


def test_central_is_asked_first_only_after_a_timeout_and_for_a_fall_back_not_heard_lately():
    assert fo.central_first(fo.TIMEOUT, B, {}, NOW)
    assert fo.central_first(fo.TIMEOUT, B, {B: NOW - fo.GATEWAY_HEARD_S}, NOW)
    assert not fo.central_first(fo.TIMEOUT, B, {B: NOW - 1.0}, NOW)  # answered lately: tried at once
    assert not fo.central_first(fo.REFUSED, B, {}, NOW)  # it failed at once: no time spent yet
    assert not fo.central_first("", B, {}, NOW)


def test_a_route_without_a_slow_gateway_is_asked_for_halfway_through_the_bounded_wait():
    assert fo.prefetch_after(2.0) == 2.0 * fo.PREFETCH_AT and fo.prefetch_after(None) is None
    assert fo.standby_fresh(NOW - 1.0, NOW) and not fo.standby_fresh(NOW - fo.STANDBY_S, NOW)
    assert not fo.standby_fresh(None, NOW)


def test_the_async_client_asks_ahead_while_a_request_waits_at_a_silent_gateway():
    """The driver's part: a call unanswered after ``slow_after`` has ``on_slow`` called and the
    background started (here the route asked for ahead), while the call goes on."""
    from shoal.client import AsyncClient

    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.host}{request.url.path}")
        if request.url.host == "g1":
            await asyncio.sleep(0.6)
            raise httpx.ReadTimeout("timed out", request=request)
        if request.url.path == "/v1/route":
            body = request.read()
            url = "http://b:8000" if b"avoid" in body else "http://g1:8000"
            doc = {
                "cluster": url[7:8],
                "url": url,
                "token": "t",
                "expires_at": int(time.time() + 300),
                "model": "m",
                "version": "1",
            }
            return httpx.Response(200, json=doc)
        if request.url.path.endswith("/infer"):
            return httpx.Response(503, json={"error": "b is saturated: the test ends"})
        return httpx.Response(404, json={"error": "no metadata"})

    async def main() -> None:
        c = AsyncClient("http://central:7000", "cam", "pw", retries=1)
        await c._http.aclose()
        c._http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        c.core.next_gateway_after = lambda r: 0.5  # type: ignore[method-assign]
        with pytest.raises(InferError):
            await c.infer("m", {"x": __import__("numpy").ones((1, 2), "float32")})
        await c.close()

    asyncio.run(main())
    routes = [x for x in seen if x.endswith("/v1/route")]
    assert len(routes) == 2  # the route, then the one without g1 asked for ahead
    assert seen.index("POST b/v2/models/m/infer") > seen.index(routes[1])  # and used at once
