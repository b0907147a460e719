"""The device client's rules (shoal/client/core.py) driven in memory: scripted answers from central
and clusters, no sockets, no sleeping; the calls and waits the rules ask for are what is checked."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest

from shoal.client import failover
from shoal.client.core import (
    NEXT_GATEWAY_AFTER_S,
    RENEW_AFTER_FAILURE_S,
    SHARED_POLL_S,
    Call,
    ClientCore,
    Finished,
    InferError,
    Race,
    Reply,
    RouteError,
    Sleep,
    Unreachable,
    backoff,
    resume,
)
from shoal.protocol.oip import encode_infer_response

CENTRAL = "http://central:7000"
NOW = 1_000_000.0
X = {"x": np.ones((1, 4), np.float32)}


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


def route_reply(cluster: str, ttl: float = 300.0, now: float = NOW) -> Reply:
    doc = {"cluster": cluster, "url": f"http://{cluster}:8000", "token": f"tok-{cluster}",
           "expires_at": int(now + ttl), "model": "m", "version": "1"}  # unix seconds, as central answers
    return Reply(200, {}, json.dumps(doc).encode())


def infer_ok(value: float = 1.0) -> Reply:
    out, hl = encode_infer_response("m", "1", "", {"y": np.full((1, 4), value, np.float32)}, None, True)
    return Reply(200, {"inference-header-content-length": str(hl)}, out)


def error(status: int, message: str, retry_after: str | None = None) -> Reply:
    headers = {"retry-after": retry_after} if retry_after else {}
    return Reply(status, headers, json.dumps({"error": message}).encode())


class Script:
    """Answers each call by the first rule whose (method, url part) matches; records calls and sleeps."""

    def __init__(self, rules: dict[tuple[str, str], list[Reply | Unreachable] | Callable[[Call], Reply]]) -> None:
        self.rules = rules
        self.calls: list[Call] = []
        self.sleeps: list[float] = []
        self.races: list[Race] = []

    def answer(self, call: Call) -> Reply | Unreachable:
        self.calls.append(call)
        for (method, part), answers in self.rules.items():
            if call.method == method and part in call.url:
                if callable(answers):
                    return answers(call)
                return answers.pop(0) if len(answers) > 1 else answers[0]
        raise AssertionError(f"unexpected call {call.method} {call.url}")

    def run(self, flow):
        outcome = None
        while not isinstance(step := resume(flow, outcome), Finished):
            if isinstance(step, Sleep):
                self.sleeps.append(step.seconds)
                outcome = None
            elif isinstance(step, Race):  # at once: the first reply in the calls' order wins
                outcome = []
                for call in step.calls:
                    won = any(isinstance(o, Reply) for o in outcome)
                    outcome.append(None if won else self.answer(call))
                self.races.append(step)
            else:
                outcome = self.answer(step)
        return step.value

    def urls(self, method: str = "POST", part: str = "") -> list[str]:
        return [c.url for c in self.calls if c.method == method and part in c.url]

    def route_bodies(self) -> list[dict]:
        return [json.loads(c.body) for c in self.calls if c.url.endswith("/v1/route")]


NO_META = {("GET", "/v2/models/"): [error(404, "no metadata")]}


def core(clock: Clock | None = None, centrals: list[str] | None = None, retries: int = 6) -> ClientCore:
    return ClientCore(centrals or [CENTRAL], "cam", "pw", retries=retries, clock=clock or Clock())


def test_a_route_is_asked_once_then_cached_until_shortly_before_it_expires():
    clock = Clock()
    c = core(clock)
    s = Script({("POST", "/v1/route"): [route_reply("a", ttl=60)], ("POST", "/infer"): [infer_ok()], **NO_META})
    for _ in range(3):
        r = s.run(c.infer("m", X))
        assert r.cluster == "a" and r.outputs["y"].tolist() == [[1, 1, 1, 1]]
    assert len(s.urls(part="/v1/route")) == 1
    first = s.calls[0]
    assert first.headers["Authorization"].startswith("Basic ") and json.loads(first.body) == {"model": "m"}
    infer = next(c for c in s.calls if c.url.endswith("/infer"))
    assert infer.url == "http://a:8000/v2/models/m/infer" and infer.headers["Authorization"] == "Bearer tok-a"
    clock.t += 51  # ten seconds before expiry: renewed
    s.run(c.infer("m", X))
    assert len(s.urls(part="/v1/route")) == 2


def test_an_unreachable_gateway_is_avoided_and_the_next_route_leaves_it_out():
    """Central leaves the gateway out of the next route: the cluster's other gateways (that the first
    route did not name yet), else another cluster."""
    c = core()
    s = Script(
        {
            ("POST", "/v1/route"): lambda call: route_reply("b" if "avoid" in json.loads(call.body) else "a"),
            ("POST", "http://a:8000"): [Unreachable("connection refused")],
            ("POST", "http://b:8000"): [infer_ok(2.0)],
            **NO_META,
        }
    )
    r = s.run(c.infer("m", X))
    assert r.cluster == "b" and r.outputs["y"][0, 0] == 2.0
    assert s.route_bodies() == [{"model": "m"}, {"model": "m", "avoid": ["http://a:8000"]}]
    assert s.sleeps == [0.05]


def test_503_waits_as_the_cluster_says_and_goes_elsewhere():
    c = core()
    s = Script(
        {
            ("POST", "/v1/route"): lambda call: route_reply("b" if "exclude" in json.loads(call.body) else "a"),
            ("POST", "http://a:8000"): [error(503, "queue full", retry_after="1")],
            ("POST", "http://b:8000"): [error(503, "queue full", retry_after="1"), infer_ok()],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).cluster == "b"
    # The first attempt waits the minimum; later ones honour Retry-After.
    assert s.sleeps == [0.05, 1.0]


def test_each_attempt_tells_the_gateway_its_time_and_a_refusal_in_milliseconds_is_honoured():
    c = ClientCore([CENTRAL], "cam", "pw", retries=6, clock=Clock(), timeout=5.0)
    refused = Reply(503, {"retry-after": "1", "retry-after-ms": "250"}, b'{"error": "overloaded"}')
    s = Script(
        {
            ("POST", "/v1/route"): [route_reply("a")],
            ("POST", "http://a:8000"): [refused, refused, infer_ok()],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).cluster == "a"
    sent = [call for call in s.calls if call.url.endswith("/infer")]
    # A first attempt with a route of one gateway waits at most NEXT_GATEWAY_AFTER_S; then the rest.
    assert [call.headers["X-Request-Timeout-Ms"] for call in sent] == ["2000", "5000", "5000"]
    assert s.sleeps == [0.05, 0.25]  # the millisecond hint, not the rounded-up second


def test_a_rate_limited_device_waits_as_told_then_tries_again():
    c = core()
    limited = Reply(429, {"retry-after": "1", "retry-after-ms": "700"}, b'{"error": "over the rate limit"}')
    s = Script({("POST", "/v1/route"): [route_reply("a")], ("POST", "http://a:8000"): [limited, infer_ok()], **NO_META})
    assert s.run(c.infer("m", X)).cluster == "a"
    assert s.sleeps == [0.7] and len(s.urls(part="/v1/route")) == 1  # the same route, no other cluster


@pytest.mark.parametrize("header", ["²", "nan", "inf", "-3", "1e999", "Wed, 21 Oct 2026 07:28:00 GMT", "", None])
def test_a_retry_after_that_is_not_seconds_counts_as_none(header):
    assert backoff(1, header) == 0.1  # the doubling alone, no exception
    assert backoff(1, "1.5") == 1.5 and backoff(0, "1.5") == 0.05 and backoff(3, "60") == 2.0


def test_401_asks_for_a_fresh_route_at_once():
    c = core()
    s = Script(
        {
            ("POST", "/v1/route"): [route_reply("a"), route_reply("a")],
            ("POST", "http://a:8000"): [error(401, "invalid token: token expired"), infer_ok()],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).cluster == "a"
    assert len(s.urls(part="/v1/route")) == 2 and s.sleeps == [0.0]


def test_the_devices_own_mistake_is_raised_at_once_with_the_clusters_message():
    c = core()
    s = Script({("POST", "/v1/route"): [route_reply("a")], ("POST", "http://a:8000"): [error(400, "bad shape")], **NO_META})
    with pytest.raises(InferError, match="bad shape") as e:
        s.run(c.infer("m", X))
    assert e.value.status == 400 and s.sleeps == []


def test_central_down_keeps_the_last_route_even_one_whose_cluster_failed():
    clock = Clock()
    c = core(clock)
    down = Unreachable("central: connection refused")
    s = Script(
        {
            ("POST", "/v1/route"): [route_reply("a", ttl=60), down],
            ("POST", "http://a:8000"): [infer_ok(), Unreachable("restarting"), infer_ok(3.0)],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).cluster == "a"
    r = s.run(c.infer("m", X))  # the cluster drops once; central is down: the same route again
    assert r.cluster == "a" and r.outputs["y"][0, 0] == 3.0 and s.sleeps == [0.05]
    clock.t += 61  # the token has expired: nothing usable is left
    with pytest.raises(RouteError, match="no central reachable"):
        s.run(c.infer("m", X))


def test_no_route_yet_is_asked_again_then_given_up_with_centrals_message():
    c = core(retries=3)
    s = Script({("POST", "/v1/route"): [error(404, "no live cluster serves model 'm'")]})
    with pytest.raises(RouteError, match="no live cluster serves model 'm'") as e:
        s.run(c.infer("m", X))
    assert e.value.status == 404 and len(s.urls(part="/v1/route")) == 4
    assert s.sleeps == [0.05, 0.1, 0.2]
    c = core()
    s = Script(
        {
            ("POST", "/v1/route"): [error(503, "central has just started"), route_reply("a")],
            ("POST", "http://a:8000"): [infer_ok()],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).cluster == "a" and s.sleeps == [0.05]
    c = core()
    s = Script({("POST", "/v1/route"): [error(401, "wrong name or password for a device account")]})
    with pytest.raises(RouteError, match="401"):
        s.run(c.infer("m", X))
    assert s.sleeps == []  # wrong credentials: asking again would not help


def test_every_cluster_failed_once_then_all_are_tried_again():
    c = core()
    s = Script(
        {
            ("POST", "/v1/route"): lambda call: (
                error(404, "no live cluster serves model 'm' (excluding a)")
                if "exclude" in json.loads(call.body)
                else route_reply("a")
            ),
            ("POST", "http://a:8000"): [error(502, "worker died"), infer_ok()],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).cluster == "a"
    assert s.route_bodies() == [{"model": "m"}, {"model": "m", "exclude": ["a"]}, {"model": "m"}]


def test_replicas_are_tried_in_turn():
    c = core(centrals=["http://c1:7000", "http://c2:7000/"])
    s = Script(
        {
            ("POST", "http://c1:7000/v1/route"): [Unreachable("down")],
            ("POST", "http://c2:7000/v1/route"): [route_reply("a")],
            ("POST", "http://a:8000"): [infer_ok()],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).cluster == "a"
    assert s.urls(part="/v1/route") == ["http://c1:7000/v1/route", "http://c2:7000/v1/route"]


def test_a_replica_that_did_not_answer_is_asked_last_from_then_on():
    """A central replica whose machine vanished costs the bounded wait once, not at every route asked
    for after (the lab found devices held 4.9 s when a gateway was lost after a replica: 2 s at the
    gateway, then 2 s more at the dead replica before the live one gave a route without it)."""
    c = core(centrals=["http://c1:7000", "http://c2:7000"])
    s = Script(
        {
            ("POST", "http://c1:7000/v1/route"): [Unreachable("down"), route_reply("b")],
            ("POST", "http://c2:7000/v1/route"): [route_reply("a")],
            ("POST", "http://a:8000"): [infer_ok()],
            ("POST", "http://b:8000"): [infer_ok()],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).cluster == "a"
    c.routes.clear()  # the route is asked for again (expired, renewed, its cluster failed)
    assert s.run(c.infer("m", X)).cluster == "a"
    assert s.urls(part="/v1/route") == [
        "http://c1:7000/v1/route",
        "http://c2:7000/v1/route",
        "http://c2:7000/v1/route",
    ]
    assert c.centrals == ["http://c2:7000", "http://c1:7000"]


def test_labels_come_from_the_clusters_metadata():
    c = core()
    meta = {"name": "m", "versions": ["1"], "parameters": {"labels": {"y": ["a", "b", "c", "d"]}}}
    s = Script(
        {
            ("POST", "/v1/route"): [route_reply("a")],
            ("GET", "/v2/models/m"): [Reply(200, {}, json.dumps(meta).encode())],
            ("POST", "http://a:8000"): [infer_ok()],
        }
    )
    r = s.run(c.infer("m", {"x": np.ones((1, 4), np.float32)}))
    assert r.labels == {"y": ["a", "b", "c", "d"]} and r.label("y") == "a"
    assert r.to_json()["labels"] == {"y": "a"}


def test_images_go_as_they_are_and_large_tensors_compressed():
    c = core()
    body, headers = c.infer_body(None, b"\x89PNG...")
    assert body == b"\x89PNG..." and headers["Inference-Header-Content-Length"] == "0"
    body, headers = c.infer_body({"x": np.zeros((1, 10_000), np.float32)}, None)
    assert headers["Content-Encoding"] == "zstd" and len(body) < 10_000
    with pytest.raises(ValueError, match="inputs"):
        c.infer_body(None, None)


def test_commands_long_poll_and_ack():
    c = core()
    cmd = {"id": 7, "command": "reboot", "args": {}, "created_at": 1.0, "created_by": "op"}
    s = Script(
        {
            ("GET", "/v1/commands"): [Reply(200, {}, json.dumps({"commands": [cmd]}).encode())],
            ("POST", "/v1/commands/7/ack"): [Reply(200, {}, b'{"ok": true, "id": 7}')],
        }
    )
    assert s.run(c.commands(25.0, 10.0)) == [cmd]
    poll = s.calls[0]
    assert poll.url.endswith("/v1/commands?wait=25") and poll.timeout == 35.0  # longer than the poll
    assert s.run(c.ack(7, {"ok": True})) is None
    assert json.loads(s.calls[1].body) == {"result": {"ok": True}}
    s = Script({("POST", "/ack"): [error(404, "no unacknowledged command 7")]})
    with pytest.raises(RouteError, match="no unacknowledged"):
        s.run(c.ack(7))


# ------------------------------------------------------------------ a cluster of several gateways


def gateways_reply(cluster: str, urls: list[str]) -> Reply:
    doc = {
        "cluster": cluster,
        "url": urls[0],
        "fallbacks": urls[1:],
        "token": f"tok-{cluster}",
        "expires_at": int(NOW + 300),
        "model": "m",
        "version": "1",
    }
    return Reply(200, {}, json.dumps(doc).encode())


GW = ["http://g1:8000", "http://g2:8000", "http://g3:8000"]


@pytest.mark.parametrize(
    "failure",
    [
        Unreachable("connection refused"),
        Unreachable("reset mid-request"),
        error(503, "gateway shutting down"),
        error(503, "model 'm' version 1 is saturated", retry_after="2"),
        error(502, "request failed on 2 workers"),
    ],
)
def test_a_failed_gateway_hands_the_same_request_to_the_routes_next_gateway_without_central(failure):
    c = core()
    s = Script(
        {
            ("POST", "/v1/route"): [gateways_reply("site", GW)],
            ("POST", "http://g1:8000"): [failure],
            ("POST", "http://g2:8000"): [infer_ok(2.0)],
            **NO_META,
        }
    )
    r = s.run(c.infer("m", X))
    assert r.cluster == "site" and r.gateway == "http://g2:8000" and r.outputs["y"][0, 0] == 2.0
    assert len(s.urls(part="/v1/route")) == 1 and s.sleeps == []
    sent = [call for call in s.calls if call.url.endswith("/infer")]
    assert [call.url.split("/v2")[0] for call in sent] == GW[:2]
    # The same request: body, token and request id.
    assert sent[0].body == sent[1].body and sent[0].headers == sent[1].headers
    assert sent[0].headers["Authorization"] == "Bearer tok-site"
    assert len(sent[0].headers["X-Request-Id"]) == 32
    # The gateway that failed goes last for the next requests; g2 answers them at once.
    assert c.routes[("m", None)].urls == ["http://g2:8000", "http://g3:8000", "http://g1:8000"]
    s.run(c.infer("m", X))
    assert s.urls(part="/infer")[-1] == "http://g2:8000/v2/models/m/infer" and len(s.urls(part="/infer")) == 3


def test_when_every_gateway_of_the_route_failed_central_is_asked_for_another_cluster():
    c = core()
    s = Script(
        {
            ("POST", "/v1/route"): lambda call: (
                route_reply("b") if "exclude" in json.loads(call.body) else gateways_reply("a", GW[:2])
            ),
            ("POST", "http://g1:8000"): [Unreachable("refused")],
            ("POST", "http://g2:8000"): [error(503, "gateway shutting down", retry_after="1")],
            ("POST", "http://b:8000"): [infer_ok(3.0)],
            **NO_META,
        }
    )
    r = s.run(c.infer("m", X))
    assert r.cluster == "b" and r.outputs["y"][0, 0] == 3.0
    assert s.route_bodies() == [{"model": "m"}, {"model": "m", "exclude": ["a"]}]
    assert s.urls(part="/infer") == [f"{u}/v2/models/m/infer" for u in (*GW[:2], "http://b:8000")]
    assert s.sleeps == [0.05]  # one back-off, after the whole route failed
    ids = {call.headers["X-Request-Id"] for call in s.calls if call.url.endswith("/infer")}
    assert len(ids) == 1  # one request, whichever gateway and cluster it went to


def test_a_clusters_own_answers_are_not_tried_on_its_other_gateways():
    c = core()
    s = Script(
        {
            ("POST", "/v1/route"): [gateways_reply("a", GW[:2])],
            ("POST", "http://g1:8000"): [error(400, "bad shape")],
            ("POST", "http://g2:8000"): [infer_ok()],
            **NO_META,
        }
    )
    with pytest.raises(InferError, match="bad shape"):
        s.run(c.infer("m", X))
    assert s.urls(part="/infer") == ["http://g1:8000/v2/models/m/infer"]
    # A 504 (the request ran out of time there) re-routes as before instead of waiting as long again.
    c = core()
    s = Script(
        {
            ("POST", "/v1/route"): lambda call: (
                route_reply("b") if "exclude" in json.loads(call.body) else gateways_reply("a", GW[:2])
            ),
            ("POST", "http://g1:8000"): [error(504, "timed out")],
            ("POST", "http://b:8000"): [infer_ok()],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).cluster == "b" and "http://g2:8000/v2/models/m/infer" not in s.urls()


def test_a_callers_request_id_is_kept_and_labels_come_from_a_gateway_that_answers():
    c = core()
    meta = {"name": "m", "versions": ["1"], "parameters": {"labels": {"y": ["a", "b", "c", "d"]}}}
    s = Script(
        {
            ("POST", "/v1/route"): [gateways_reply("site", GW[:2])],
            ("GET", "http://g1:8000"): [Unreachable("refused")],
            ("GET", "http://g2:8000"): [Reply(200, {}, json.dumps(meta).encode())],
            ("POST", "http://g1:8000"): [infer_ok()],
        }
    )
    body, headers = c.infer_body(X, None)
    r = s.run(c.send_infer("m", body, {**headers, "x-request-id": "cam-7-frame-12"}))
    assert r.labels == {"y": ["a", "b", "c", "d"]}
    (sent,) = [call for call in s.calls if call.url.endswith("/infer")]
    assert sent.headers["x-request-id"] == "cam-7-frame-12" and "X-Request-Id" not in sent.headers


def test_a_gateway_that_answers_nothing_is_left_after_a_bounded_wait_and_tried_last_from_then_on():
    """A gateway whose machine vanished never answers and never closes: a request waits at most
    NEXT_GATEWAY_AFTER_S there on its first attempt (the last gateway of a later attempt gets the
    client's whole timeout), and the device's next requests start with the others."""
    clock = Clock()
    c = ClientCore([CENTRAL], "cam", "pw", clock=clock, timeout=10.0)
    s = Script(
        {
            ("POST", "/v1/route"): [gateways_reply("site", GW[:2])],
            ("POST", "http://g1:8000"): [Unreachable("timed out")],
            ("POST", "http://g2:8000"): [infer_ok(2.0)],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).gateway == "http://g2:8000"
    waits = {c_.url.split("/v2")[0]: c_.timeout for c_ in s.calls if c_.url.endswith("/infer")}
    assert waits == {"http://g1:8000": NEXT_GATEWAY_AFTER_S, "http://g2:8000": NEXT_GATEWAY_AFTER_S}
    assert c.routes[("m", None)].urls == ["http://g2:8000", "http://g1:8000"]
    s.calls.clear()
    assert s.run(c.infer("m", X)).gateway == "http://g2:8000"
    assert s.urls("POST", "/infer") == ["http://g2:8000/v2/models/m/infer"]  # straight to g2
    # A while later the route is asked for again: central orders the gateways by load, a gateway
    # that came back included (it would otherwise stay last until the token expired).
    clock.t += RENEW_AFTER_FAILURE_S
    s.rules[("POST", "http://g1:8000")] = [infer_ok(1.0)]
    assert s.run(c.infer("m", X)).gateway == "http://g2:8000"  # not on the request's path: g2 still
    assert c.due == {("m", None)} and not s.route_bodies()
    s.run(c.renew("m", None))  # what the driver runs beside the requests
    assert s.run(c.infer("m", X)).gateway == "http://g1:8000"
    assert len(s.route_bodies()) == 1


def test_a_route_given_without_a_gateway_that_failed_is_asked_for_again_later():
    """A route central gave while avoiding a gateway that did not answer is due again after a while,
    like a route one of whose gateways failed: that gateway may heal, and the route has no fall-back
    meanwhile (the lab found devices held 4.9 s when the gateway of such a route was lost too, 40 s
    after the first had healed: their route still named only it)."""
    clock = Clock()
    c = ClientCore([CENTRAL], "cam", "pw", clock=clock, timeout=10.0)
    s = Script(
        {
            ("POST", "/v1/route"): [
                gateways_reply("site", GW[:1]),
                gateways_reply("site", GW[1:2]),
                gateways_reply("site", GW[:2]),
            ],
            ("POST", "http://g1:8000"): [Unreachable("timed out"), infer_ok(1.0)],
            ("POST", "http://g2:8000"): [infer_ok(2.0)],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).gateway == "http://g2:8000"
    assert s.route_bodies()[1] == {"model": "m", "avoid": ["http://g1:8000"]}
    assert c.routes[("m", None)].urls == ["http://g2:8000"]
    clock.t += RENEW_AFTER_FAILURE_S
    assert s.run(c.infer("m", X)).gateway == "http://g2:8000" and c.due == {("m", None)}
    s.run(c.renew("m", None))
    assert c.routes[("m", None)].urls == ["http://g1:8000", "http://g2:8000"]
    assert s.run(c.infer("m", X)).gateway == "http://g1:8000"


def test_a_route_that_lost_a_gateway_of_its_cluster_is_asked_for_until_it_has_it_back():
    """Renewed while one of the cluster's gateways was down, the route names only the other: it is
    due again every RENEW_AFTER_FAILURE_S until central names the first again, so the device has a
    fall-back when the other fails (the lab found devices held 4.5 s, not 2, when the one gateway of
    such a route was lost 20 s after the first had healed)."""
    clock = Clock()
    c = ClientCore([CENTRAL], "cam", "pw", clock=clock, timeout=10.0)
    s = Script(
        {
            ("POST", "/v1/route"): [
                gateways_reply("site", GW[:2]),
                gateways_reply("site", GW[1:2]),  # g1 down when central answered
                gateways_reply("site", GW[1:2]),  # still down
                gateways_reply("site", GW[:2]),  # back
            ],
            ("POST", "http://g1:8000"): [infer_ok(1.0)],
            ("POST", "http://g2:8000"): [infer_ok(2.0)],
            **NO_META,
        }
    )
    s.run(c.infer("m", X))
    c.routes[("m", None)].renew_at = clock.t  # due again (a gateway failed a while ago)
    s.run(c.infer("m", X))
    s.run(c.renew("m", None))
    assert c.routes[("m", None)].urls == ["http://g2:8000"] and not c.due
    for _ in range(2):
        clock.t += RENEW_AFTER_FAILURE_S
        assert s.run(c.infer("m", X)).gateway in GW[:2] and c.due == {("m", None)}
        s.run(c.renew("m", None))
    assert c.routes[("m", None)].urls == ["http://g1:8000", "http://g2:8000"]
    clock.t += RENEW_AFTER_FAILURE_S
    s.run(c.infer("m", X))
    assert not c.due and len(s.route_bodies()) == 4  # whole again: due only before its token expires


def test_a_route_due_again_is_asked_for_beside_the_requests_and_kept_when_central_is_slow():
    """No request waits for it: the driver asks central (a bounded wait: a replica whose machine
    vanished answers nothing) while requests go on with the route they had, which stays if central
    does not answer."""
    clock = Clock()
    c = ClientCore([CENTRAL], "cam", "pw", clock=clock, timeout=10.0)
    s = Script(
        {
            ("POST", "/v1/route"): [gateways_reply("site", GW[:2]), Unreachable("timed out")],
            ("POST", "http://g1:8000"): [infer_ok(1.0)],
            **NO_META,
        }
    )
    s.run(c.infer("m", X))
    c.routes[("m", None)].renew_at = clock.t  # due again now
    assert s.run(c.infer("m", X)).gateway == "http://g1:8000"
    assert len(s.route_bodies()) == 1 and c.due == {("m", None)}
    assert s.run(c.infer("m", X)).gateway == "http://g1:8000"
    s.run(c.renew("m", None))
    asked = [call for call in s.calls if call.url.endswith("/v1/route")]
    assert len(asked) == 2 and asked[1].timeout == NEXT_GATEWAY_AFTER_S and not c.due
    assert s.run(c.infer("m", X)).gateway == "http://g1:8000"  # central timed out: the route it had


def test_the_only_gateway_of_a_route_gets_a_bounded_first_attempt_then_the_whole_timeout():
    c = ClientCore([CENTRAL], "cam", "pw", clock=Clock(), timeout=10.0)
    s = Script(
        {
            ("POST", "/v1/route"): [route_reply("a")],
            ("POST", "http://a:8000"): [Unreachable("timed out"), infer_ok(1.0)],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).cluster == "a"
    assert [call.timeout for call in s.calls if call.url.endswith("/infer")] == [NEXT_GATEWAY_AFTER_S, None]


CALLER_TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
CENTRAL_TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def traced_route_reply(cluster: str, traceparent: str = CENTRAL_TRACE) -> Reply:
    doc = json.loads(route_reply(cluster).data)
    return Reply(200, {}, json.dumps({**doc, "traceparent": traceparent}).encode())


def test_central_s_trace_of_a_route_goes_on_with_the_request_that_asked_for_it_only():
    """The route is cached: the requests it serves later must not land in the trace of the one that
    fetched it."""
    c = core()
    s = Script({("POST", "/v1/route"): [traced_route_reply("a")], ("POST", "/infer"): [infer_ok()], **NO_META})
    s.run(c.infer("m", X))
    s.run(c.infer("m", X))
    route, *_ = [call for call in s.calls if call.url.endswith("/v1/route")]
    assert "traceparent" not in route.headers
    first, second = [call for call in s.calls if call.url.endswith("/infer")]
    assert first.headers["traceparent"] == CENTRAL_TRACE and "traceparent" not in second.headers
    assert len(s.urls(part="/v1/route")) == 1


def test_a_callers_traceparent_goes_to_central_and_to_the_gateway():
    """Central's span of the route is then a child of the caller's, as the inference is: the
    caller's stays the request's parent (the route and the inference are the caller's two calls)."""
    c = core()
    s = Script(
        {
            ("POST", "/v1/route"): [traced_route_reply("a"), traced_route_reply("b")],
            ("POST", "http://a:8000"): [error(504, "deadline passed")],
            ("POST", "http://b:8000"): [infer_ok()],
            **NO_META,
        }
    )
    body, headers = c.infer_body(X, None)
    assert s.run(c.send_infer("m", body, {**headers, "traceparent": CALLER_TRACE})).cluster == "b"
    routes = [call for call in s.calls if call.url.endswith("/v1/route")]
    infers = [call for call in s.calls if call.url.endswith("/infer")]
    assert len(routes) == 2 and len(infers) == 2  # a's 504: another route, excluding a
    assert all(call.headers["traceparent"] == CALLER_TRACE for call in routes + infers)


def test_a_request_without_a_trace_of_its_own_keeps_central_s_first_one_through_its_retries():
    c = core()
    later = traced_route_reply("b", f"00-{'1' * 32}-{'2' * 16}-01")  # a new trace: central had none
    s = Script(
        {
            ("POST", "/v1/route"): [traced_route_reply("a"), later],
            ("POST", "http://a:8000"): [error(504, "deadline passed")],
            ("POST", "http://b:8000"): [infer_ok()],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).cluster == "b"
    first_route, second_route = [call for call in s.calls if call.url.endswith("/v1/route")]
    assert "traceparent" not in first_route.headers and second_route.headers["traceparent"] == CENTRAL_TRACE
    assert all(call.headers["traceparent"] == CENTRAL_TRACE for call in s.calls if call.url.endswith("/infer"))


def test_a_fall_back_found_dead_is_skipped_and_central_asked_at_once():
    """A gateway that refused a connection is dead: when the route's other gateway then answers
    nothing in time, the request asks central for a route without both at once instead of waiting
    NEXT_GATEWAY_AFTER_S more at the dead one (the lab found devices held 4.3 to 7.2 s when a site's
    last gateway was lost 12 s after the other: 2 s at each, then central)."""
    clock = Clock()
    c = ClientCore([CENTRAL], "cam", "pw", clock=clock, timeout=10.0)
    s = Script(
        {
            ("POST", "/v1/route"): lambda call: (
                route_reply("b") if "avoid" in json.loads(call.body) else gateways_reply("site", GW[:2])
            ),
            ("POST", "http://g1:8000"): [Unreachable("refused", kind=failover.REFUSED)],
            ("POST", "http://g2:8000"): [infer_ok(2.0), Unreachable("timed out", kind=failover.TIMEOUT)],
            ("POST", "http://b:8000"): [infer_ok(3.0)],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).gateway == "http://g2:8000"
    assert c.dead == {"http://g1:8000": NOW} and not c.to_probe  # refused: known dead, nothing to probe
    s.calls.clear()
    clock.t += 12.0
    r = s.run(c.infer("m", X))
    assert r.cluster == "b"
    assert s.urls(part="/infer") == ["http://g2:8000/v2/models/m/infer", "http://b:8000/v2/models/m/infer"]
    assert s.route_bodies() == [{"model": "m", "avoid": ["http://g1:8000", "http://g2:8000"]}]
    assert c.to_probe == {"http://g2:8000"}  # it only fell silent: its liveness is probed


def test_a_silent_gateway_is_skipped_only_once_its_liveness_probe_failed():
    """A gateway that timed out may be slow, not dead (a worker holding its batch): it is probed
    beside the requests; answered, it stays a fall-back with the bounded wait; not answered, it is
    skipped until DEAD_KEPT_S passed or it answers again."""
    clock = Clock()
    c = ClientCore([CENTRAL], "cam", "pw", clock=clock, timeout=10.0)
    silent = Unreachable("timed out", kind=failover.TIMEOUT)
    s = Script(
        {
            ("POST", "/v1/route"): lambda call: (
                route_reply("b") if "avoid" in json.loads(call.body) else gateways_reply("site", GW[:2])
            ),
            ("POST", "http://g1:8000"): [silent],
            ("POST", "http://g2:8000"): [infer_ok(2.0)],
            ("GET", "http://g1:8000/v2/health/live"): [Reply(200, {}, b""), silent],
            ("POST", "http://b:8000"): [infer_ok(3.0)],
            **NO_META,
        }
    )
    c.gateway_heard["http://g2:8000"] = NOW  # it answered lately: tried at once after g1
    assert s.run(c.infer("m", X)).gateway == "http://g2:8000"
    assert c.to_probe == {"http://g1:8000"}
    (probe,) = c.background()
    assert c.background() == []  # one probe at a time
    s.run(probe)
    live = [call for call in s.calls if call.url.endswith("/health/live")]
    assert live[0].timeout == failover.PROBE_TIMEOUT_S and not c.dead and not c.probing
    # Answered: a fall-back as before (route [g2, g1]: g2 silent now, g1 tried with the bounded wait).
    s.rules[("POST", "http://g2:8000")] = [silent]
    s.rules[("POST", "http://g1:8000")] = [infer_ok(1.0)]
    assert s.run(c.infer("m", X)).gateway == "http://g1:8000"
    # g2 silent, probed, and its probe not answered: dead, skipped on first attempts.
    s.rules[("GET", "http://g2:8000/v2/health/live")] = [silent]
    for flow in c.background():
        s.run(flow)
    assert c.dead == {"http://g2:8000": NOW}
    s.rules[("POST", "http://g1:8000")] = [silent]
    s.calls.clear()
    assert s.run(c.infer("m", X)).cluster == "b"
    assert "http://g2:8000/v2/models/m/infer" not in s.urls(part="/infer")
    # DEAD_KEPT_S later it is tried again; an answer clears it.
    clock.t += failover.DEAD_KEPT_S
    c.routes.clear()
    s.rules[("POST", "http://g2:8000")] = [infer_ok(2.0)]
    s.rules[("POST", "/v1/route")] = [gateways_reply("site", GW[1:2])]
    assert s.run(c.infer("m", X)).gateway == "http://g2:8000" and not c.dead


def test_replicas_are_asked_at_once_unless_the_first_answered_lately():
    """A replica whose machine vanished since it last answered this device would cost a bounded wait
    on the request path (the lab traced 2 s of a device's 4.3 to 7.2 s to a replica lost 36 s before):
    while the first has not answered within HEARD_S, every replica is asked at once."""
    clock = Clock()
    c = ClientCore(["http://c1:7000", "http://c2:7000"], "cam", "pw", clock=clock, timeout=10.0)
    s = Script(
        {
            ("POST", "http://c1:7000/v1/route"): [Unreachable("timed out", kind=failover.TIMEOUT)],
            ("POST", "http://c2:7000/v1/route"): [route_reply("a")],
            ("POST", "http://a:8000"): [infer_ok()],
            **NO_META,
        }
    )
    assert s.run(c.infer("m", X)).cluster == "a"
    (race,) = s.races
    assert [call.url for call in race.calls] == ["http://c1:7000/v1/route", "http://c2:7000/v1/route"]
    assert all(call.timeout is None for call in race.calls)  # on the request path: the whole timeout
    assert c.centrals == ["http://c2:7000", "http://c1:7000"] and c.heard == {"http://c2:7000": NOW}
    c.routes.clear()
    clock.t += failover.HEARD_S / 2
    s.run(c.infer("m", X))
    assert len(s.races) == 1 and s.urls(part="/v1/route")[-1] == "http://c2:7000/v1/route"  # in turn
    c.routes[("m", None)].renew_at = clock.t
    clock.t += failover.HEARD_S
    s.run(c.infer("m", X))
    (renewal,) = c.background()
    s.run(renewal)
    assert len(s.races) == 2 and all(call.timeout == NEXT_GATEWAY_AFTER_S for call in s.races[1].calls)
    # The winner is asked first from then on; the first in the calls' order wins a tie.
    assert s.races[1].calls[0].url == "http://c2:7000/v1/route" and c.centrals[0] == "http://c2:7000"


def test_a_gateway_found_dead_is_tried_again_once_central_names_it_well_after():
    """A gateway healed from a partition: central names it again once it reports, and the device,
    renewing its route, stops skipping it (the lab found devices skipping a healed gateway 25 s on,
    and asking central when the other was lost, rather than failing over to it)."""
    clock = Clock()
    c = ClientCore([CENTRAL], "cam", "pw", clock=clock, timeout=10.0)
    s = Script(
        {
            ("POST", "/v1/route"): [gateways_reply("site", GW[:2])],
            ("POST", "http://g1:8000"): [Unreachable("refused", kind=failover.REFUSED)],
            ("POST", "http://g2:8000"): [infer_ok(2.0)],
            **NO_META,
        }
    )
    s.run(c.infer("m", X))
    assert "http://g1:8000" in c.dead
    clock.t += 1.0  # central has not dropped it yet: its route still names it
    s.run(c.renew("m", None))
    assert "http://g1:8000" in c.dead
    clock.t += failover.CENTRAL_SEES_S
    s.run(c.renew("m", None))
    assert not c.dead


def test_after_a_silent_gateway_central_is_asked_before_a_fall_back_not_heard_from_lately():
    """A fall-back this device never sent to may have been lost unseen; central, which hears every
    gateway, is asked first (the lab found a device wait 2 s at the first gateway, 2 s at a fall-back
    lost 30 s before, then ask central). One heard from lately is tried at once."""
    clock = Clock()
    c = ClientCore([CENTRAL], "cam", "pw", clock=clock, timeout=10.0)
    silent = Unreachable("timed out", kind=failover.TIMEOUT)
    s = Script(
        {
            ("POST", "/v1/route"): lambda call: (
                route_reply("b") if "avoid" in json.loads(call.body) else gateways_reply("site", GW[:2])
            ),
            ("POST", "http://g1:8000"): [infer_ok(1.0), silent],
            ("POST", "http://b:8000"): [infer_ok(3.0)],
            **NO_META,
        }
    )
    s.run(c.infer("m", X))
    r = s.run(c.infer("m", X))
    assert r.cluster == "b" and "http://g2:8000/v2/models/m/infer" not in s.urls(part="/infer")
    assert s.route_bodies()[-1] == {"model": "m", "avoid": ["http://g1:8000"]}  # not g2: not known bad
    assert s.sleeps == [0.05]
    # Heard from lately, the fall-back is tried at once.
    c = ClientCore([CENTRAL], "cam", "pw", clock=clock, timeout=10.0)
    s.rules[("POST", "http://g1:8000")] = [silent]
    s.rules[("POST", "http://g2:8000")] = [infer_ok(2.0)]
    c.gateway_heard["http://g2:8000"] = clock.t - failover.GATEWAY_HEARD_S / 2
    assert s.run(c.infer("m", X)).gateway == "http://g2:8000"


def test_requests_that_fail_together_share_one_route_from_central():
    """The requests in flight at a gateway that was lost time out together: the first asks central for
    a route without it, the others wait for that answer instead of each asking (the lab found 16
    route requests at once at the surviving replica, answered in 1 s rather than 0.1 s)."""
    c = ClientCore([CENTRAL], "cam", "pw", clock=Clock(), timeout=10.0)
    first, second = c.infer("m", X), c.infer("m", X)
    silent = Unreachable("timed out", kind=failover.TIMEOUT)
    # Both sent to g1 on the route central gave the first.
    step = resume(first, None)
    assert step.url.endswith("/v1/route")
    step = resume(first, gateways_reply("site", GW[:1]))
    assert isinstance(step, Call) and "/v2/models/m" in step.url and step.method == "GET"
    step = resume(first, error(404, "no metadata"))
    assert step.url == "http://g1:8000/v2/models/m/infer"
    step2 = resume(second, None)
    assert step2.url == "http://g1:8000/v2/models/m/infer"
    # g1 answers neither; the first asks central (after its back-off), the second waits for it.
    assert isinstance(resume(first, silent), Sleep)
    ask = resume(first, None)
    assert ask.url.endswith("/v1/route") and json.loads(ask.body)["avoid"] == ["http://g1:8000"]
    assert isinstance(resume(second, silent), Sleep)
    assert resume(second, None) == Sleep(SHARED_POLL_S)
    meta = resume(first, route_reply("b"))
    assert resume(first, error(404, "no metadata")).url == "http://b:8000/v2/models/m/infer"
    assert resume(second, None).url == "http://b:8000/v2/models/m/infer"  # central's answer, not asked again
    assert meta.method == "GET"


def test_a_route_without_a_slow_gateway_is_asked_for_ahead_and_used_if_it_fails():
    """Halfway through its bounded wait the request has the client ask central, beside it, for a route
    without that gateway; when the gateway then fails, the request goes on with it at once rather than
    asking central only then (the lab found central taking 0.4 to 0.9 s under load, which put devices
    just past 3 s when the first site's last gateway was lost)."""
    clock = Clock()
    c = ClientCore([CENTRAL], "cam", "pw", clock=clock, timeout=10.0)
    silent = Unreachable("timed out", kind=failover.TIMEOUT)
    flow = c.infer("m", X)
    assert resume(flow, None).url.endswith("/v1/route")
    resume(flow, gateways_reply("site", GW[:1]))
    sent = resume(flow, error(404, "no metadata"))
    assert sent.url == "http://g1:8000/v2/models/m/infer"
    assert sent.slow_after == NEXT_GATEWAY_AFTER_S * failover.PREFETCH_AT
    sent.on_slow()  # what the driver does once it has waited that long
    sent.on_slow()  # once per gateway
    (ahead,) = c.background()
    s = Script({("POST", "/v1/route"): [route_reply("b")], **NO_META})
    s.run(ahead)
    assert s.route_bodies() == [{"model": "m", "avoid": ["http://g1:8000"]}]
    assert c.routes[("m", None)].urls == ["http://g1:8000"]  # not used while g1 may still answer
    assert isinstance(resume(flow, silent), Sleep)  # g1 failed: central's route is there already
    assert resume(flow, None).url == "http://b:8000/v2/models/m/infer"
    assert len(s.route_bodies()) == 1
    # A gateway that answers in the end costs only that route request.
    clock.t += failover.STANDBY_S
    c2 = ClientCore([CENTRAL], "cam", "pw", clock=clock, timeout=10.0)
    s2 = Script(
        {("POST", "/v1/route"): [gateways_reply("site", GW[:1])], ("POST", "http://g1"): [infer_ok()], **NO_META}
    )
    assert s2.run(c2.infer("m", X)).gateway == "http://g1:8000" and not c2.standby
