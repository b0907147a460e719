"""The worker link's state machine in memory: handshake, refusal, drain, silence, limits, bad bytes."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.protocol.frames import MsgType, encode_frame_bytes
from shoal.protocol.link import (
    LOGIN_MAX_FRAME,
    Challenge,
    Drain,
    Goodbye,
    Heartbeat,
    Hello,
    LinkConnection,
    LinkError,
    Load,
    LocalLinkError,
    Refuse,
    Request,
    Result,
    Role,
    State,
    Welcome,
)
from shoal.protocol.link_messages import TensorDesc, TensorSpecMsg


def wire(parts) -> bytes:
    return b"".join(bytes(p) for p in parts)


def hello(**kw) -> Hello:
    spec = TensorSpecMsg("x", "FP32", [-1, 4])
    return Hello(protocol=1, worker_id="w1", proof=b"p" * 32, model="echo", model_version="1",
                 inputs=[spec], outputs=[spec], capacity=8, **kw)


def logged_in() -> tuple[LinkConnection, LinkConnection]:
    gw, wk = LinkConnection(Role.GATEWAY), LinkConnection(Role.WORKER)
    [(c, _)] = wk.receive_data(wire(gw.send(Challenge([1], b"n" * 32, "gw"))))
    assert isinstance(c, Challenge) and c.nonce == b"n" * 32
    [(h, _)] = gw.receive_data(wire(wk.send(hello(max_frame_size=1 << 21))))
    assert isinstance(h, Hello) and h.capacity == 8 and gw.peer_max_frame_size == 1 << 21
    assert gw.state is State.HANDSHAKE
    [(w, _)] = wk.receive_data(wire(gw.send(Welcome(1, "gw", max_frame_size=1 << 22))))
    assert isinstance(w, Welcome) and wk.peer_max_frame_size == 1 << 22
    assert gw.state is State.READY and wk.state is State.READY
    return gw, wk


def test_handshake_then_a_request_and_its_result():
    gw, wk = logged_in()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    req = Request(7, [TensorDesc("x", "FP32", [2, 4], x.nbytes)], rid="dev-1")
    [(r, payload)] = wk.receive_data(wire(gw.send(req, [x.tobytes()])))
    assert r == req and np.array_equal(np.frombuffer(payload, np.float32).reshape(2, 4), x)
    [(res, payload)] = gw.receive_data(wire(wk.send(Result(7, [TensorDesc("y", "FP32", [2, 4], x.nbytes)], 0.5, 2),
                                                    [x.tobytes()])))
    assert isinstance(res, Result) and res.id == 7 and res.batch == 2 and len(payload) == x.nbytes


def test_a_refused_login_closes_both_ends():
    gw, wk = LinkConnection(Role.GATEWAY), LinkConnection(Role.WORKER)
    wk.receive_data(wire(gw.send(Challenge([1], b"n" * 32))))
    gw.receive_data(wire(wk.send(hello())))
    [(r, _)] = wk.receive_data(wire(gw.send(Refuse("login failed: wrong cluster secret", retry_after_s=4))))
    assert isinstance(r, Refuse) and r.retry_after_s == 4
    assert gw.state is State.CLOSED and wk.state is State.CLOSED
    with pytest.raises(LocalLinkError):
        gw.send(Request(1, []))


def test_nothing_but_one_small_hello_before_login():
    gw = LinkConnection(Role.GATEWAY)
    gw.send(Challenge([1], b"n" * 32))
    with pytest.raises(LinkError, match="unexpected LOAD before logging in"):
        gw.receive_data(encode_frame_bytes(MsgType.LOAD, {}))
    assert gw.state is State.ERROR
    big = LinkConnection(Role.GATEWAY)
    prefix = (LOGIN_MAX_FRAME + 1).to_bytes(4, "big") + bytes([1, int(MsgType.HELLO)]) + (100).to_bytes(4, "big")
    with pytest.raises(LinkError, match="frame length"):
        big.receive_data(prefix)  # refused from the length alone: nothing buffered


def test_this_side_cannot_break_the_protocol_either():
    wk = LinkConnection(Role.WORKER)
    with pytest.raises(LocalLinkError):
        wk.send(Result(1, []))  # no results before logging in
    gw, wk = logged_in()
    with pytest.raises(LocalLinkError):
        gw.send(Result(1, []))  # a gateway never sends results


def test_drain_stops_new_requests_but_not_answers_and_goodbye_closes():
    gw, wk = logged_in()
    wk.receive_data(wire(gw.send(Drain())))
    assert gw.state is State.DRAINING and wk.state is State.DRAINING
    gw.receive_data(wire(wk.send(Result(1, []))))  # what it held is still answered
    gw.receive_data(wire(wk.send(Load(in_flight=0, draining=True))))
    gw.receive_data(wire(wk.send(Goodbye("drained"))))
    assert gw.state is State.CLOSED
    other, _ = logged_in()
    other.send(Drain())
    with pytest.raises(LocalLinkError, match="cannot send REQUEST in state draining"):
        other.send(Request(2, []))
    assert other.state is State.ERROR  # as in h11: a local protocol error ends the connection


def test_a_worker_can_drain_on_its_own_and_ignores_messages_it_does_not_know():
    gw, wk = logged_in()
    gw.receive_data(wire(wk.send(Drain())))
    assert gw.state is State.DRAINING
    gw2, wk2 = logged_in()
    assert wk2.receive_data(encode_frame_bytes(MsgType.RESULT, {"id": 1, "outputs": []})) == []


def test_old_peers_speak_the_same_wire():
    """Headers as plain MessagePack maps (what workers before typed messages sent) decode the same."""
    gw = LinkConnection(Role.GATEWAY)
    gw.send(Challenge([1], b"n" * 32))
    old = {"protocol": 1, "worker_id": "w", "proof": b"p" * 32, "model": "m", "model_version": "1",
           "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}], "outputs": [], "capacity": 4,
           "runtime": "onnx", "device": "cpu", "labels": {}, "image_input": None, "pid": 1, "host": "h"}
    hdr = msgpack.packb(old, use_bin_type=True)
    frame = (6 + len(hdr)).to_bytes(4, "big") + bytes([1, int(MsgType.HELLO)]) + len(hdr).to_bytes(4, "big") + hdr
    [(h, _)] = gw.receive_data(frame)
    assert isinstance(h, Hello) and h.capacity == 4 and list(h.inputs[0].shape) == [-1]


def test_a_malformed_header_names_the_field():
    gw = LinkConnection(Role.GATEWAY)
    gw.send(Challenge([1], b"n" * 32))
    with pytest.raises(LinkError, match=r"HELLO: Expected `int`, got `str` - at `\$.capacity`"):
        gw.receive_data(encode_frame_bytes(MsgType.HELLO, {
            "protocol": 1, "worker_id": "w", "proof": b"p", "model": "m", "model_version": "1",
            "inputs": [], "outputs": [], "capacity": "lots"}))


def test_a_silent_peer_is_dead_after_its_time():
    hb = Heartbeat(5.0, now=100.0)
    assert not hb.dead(104.0)
    hb.seen(104.0)
    assert not hb.dead(109.0) and hb.dead(109.5) and hb.silent_for(109.5) == pytest.approx(5.5)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([Role.GATEWAY, Role.WORKER]))
def test_random_bytes_are_a_link_error_or_nothing(data, role):
    c = LinkConnection(role)
    if role is Role.GATEWAY:
        c.send(Challenge([1], b"n" * 32))
    try:
        c.receive_data(data)
    except LinkError:
        assert c.state is State.ERROR
