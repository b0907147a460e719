"""The worker link's state machine in memory: handshake, refusal, drain, silence, limits, bad bytes;
its table cell by cell, the close event, ``joined`` negotiated, and random sequences of events."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.protocol.frames import MsgType, encode_frame_bytes
from shoal.protocol.interface import TensorSpec
from shoal.protocol.link import (
    CLOSE,
    LOGIN_MAX_FRAME,
    TRANSITIONS,
    Cancel,
    Challenge,
    Drain,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    LinkConnection,
    LinkError,
    Load,
    LocalLinkError,
    Peers,
    Ping,
    Pong,
    Refuse,
    Request,
    Requests,
    Result,
    Results,
    Role,
    State,
    Welcome,
)
from shoal.protocol.link_messages import TensorDesc


def wire(parts) -> bytes:
    return b"".join(bytes(p) for p in parts)


def hello(**kw) -> Hello:
    spec = TensorSpec("x", "FP32", (-1, 4))
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


# ------------------------------------------------------------------------ the table, cell by cell

G, W = Role.GATEWAY, Role.WORKER
HS, RD, DR, CL, ER = State.HANDSHAKE, State.READY, State.DRAINING, State.CLOSED, State.ERROR
T = MsgType
JOINED_ONLY = {T.REQUESTS, T.RESULTS}

# What each side may send, and the state after, written out apart from link.py's table: a link
# that did not negotiate ``joined`` has neither REQUESTS nor RESULTS.
SENDS: dict[tuple[Role, State], dict[MsgType, State]] = {
    (G, HS): {T.CHALLENGE: HS, T.WELCOME: RD, T.REFUSE: CL},
    (G, RD): {T.REQUEST: RD, T.REQUESTS: RD, T.PING: RD, T.PEERS: RD, T.CANCEL: RD, T.DRAIN: DR, T.GOODBYE: CL},
    (G, DR): {T.PING: DR, T.PEERS: DR, T.CANCEL: DR, T.DRAIN: DR, T.GOODBYE: CL},
    (G, CL): {},
    (G, ER): {T.REFUSE: ER, T.GOODBYE: ER},  # the last word before closing
    (W, HS): {T.HELLO: HS},
    (W, RD): {T.RESULT: RD, T.RESULTS: RD, T.ERROR: RD, T.LOAD: RD, T.PONG: RD, T.DRAIN: DR, T.GOODBYE: CL},
    (W, DR): {T.RESULT: DR, T.RESULTS: DR, T.ERROR: DR, T.LOAD: DR, T.PONG: DR, T.DRAIN: DR, T.GOODBYE: CL},
    (W, CL): {},
    (W, ER): {},
}
# What each side accepts; a logged-in worker ignores the rest (IGNORED), but REQUESTS unless joined.
IGNORED = "ignored"
RECEIVES: dict[tuple[Role, State], dict[MsgType, State]] = {
    (G, HS): {T.HELLO: HS},
    (G, RD): {T.RESULT: RD, T.RESULTS: RD, T.ERROR: RD, T.LOAD: RD, T.PONG: RD, T.DRAIN: DR, T.GOODBYE: CL},
    (G, DR): {T.RESULT: DR, T.RESULTS: DR, T.ERROR: DR, T.LOAD: DR, T.PONG: DR, T.DRAIN: DR, T.GOODBYE: CL},
    (G, CL): {},
    (G, ER): {},
    (W, HS): {T.CHALLENGE: HS, T.WELCOME: RD, T.REFUSE: CL},
    (W, RD): {T.REQUEST: RD, T.REQUESTS: RD, T.PING: RD, T.PEERS: RD, T.CANCEL: RD, T.DRAIN: DR, T.GOODBYE: CL},
    (W, DR): {  # REQUEST(S): sent before DRAIN was read
        T.REQUEST: DR, T.REQUESTS: DR, T.PING: DR, T.PEERS: DR, T.CANCEL: DR, T.DRAIN: DR, T.GOODBYE: CL
    },
    (W, CL): {},
    (W, ER): {},
}


def sample(t: MsgType, joined: bool = True):
    return {
        T.CHALLENGE: Challenge([1], b"n" * 32, "gw"),
        T.HELLO: hello(joined=joined),
        T.WELCOME: Welcome(1, "gw"),
        T.REFUSE: Refuse("no"),
        T.REQUEST: Request(1, []),
        T.RESULT: Result(1, []),
        T.ERROR: Error(1, "failed", 500),
        T.LOAD: Load(in_flight=1),
        T.PING: Ping(1.0),
        T.PONG: Pong(1.0),
        T.DRAIN: Drain(),
        T.GOODBYE: Goodbye("bye"),
        T.REQUESTS: Requests([1, 2], [1, 1], []),
        T.RESULTS: Results([1, 2], [1, 1], []),
        T.PEERS: Peers(["127.0.0.1:8003"]),
        T.CANCEL: Cancel([1]),
    }[t]


def expected(role: Role, state: State, joined: bool, t: MsgType, sending: bool) -> State | str | None:
    """The state after, IGNORED, or None: refused."""
    allowed = (SENDS if sending else RECEIVES)[role, state]
    if t in JOINED_ONLY and not joined:
        return None
    if t in allowed:
        return allowed[t]
    if not sending and role is W and state in (RD, DR):
        return IGNORED
    return None


def logged_in_pair(joined: bool) -> tuple[LinkConnection, LinkConnection]:
    gw, wk = LinkConnection(Role.GATEWAY), LinkConnection(Role.WORKER)
    wk.receive_data(wire(gw.send(Challenge([1], b"n" * 32))))
    gw.receive_data(wire(wk.send(hello(joined=joined))))
    wk.receive_data(wire(gw.send(Welcome(1, "gw"))))
    assert gw.joined is joined and wk.joined is joined
    return gw, wk


def in_state(role: Role, state: State, joined: bool) -> LinkConnection:
    """One end in ``state`` on a link that did (or did not) negotiate ``joined``."""
    if state is HS:
        gw, wk = LinkConnection(Role.GATEWAY), LinkConnection(Role.WORKER)
        wk.receive_data(wire(gw.send(Challenge([1], b"n" * 32))))
        gw.receive_data(wire(wk.send(hello(joined=joined))))
        c = gw if role is G else wk
    else:
        gw, wk = logged_in_pair(joined)
        c = gw if role is G else wk
        if state is DR:
            c.send(Drain())
        elif state is CL:
            c.send(Goodbye("bye"))
        elif state is ER:
            with pytest.raises(LinkError):
                c.receive_data(bytes([0, 0, 0, 6, 9, 9, 0, 0, 0, 0]))  # frame version 9
    assert c.state is state
    return c


CELLS = [(r, s, j) for r in Role for s in State for j in (False, True)]


@pytest.mark.parametrize(("role", "state", "joined"), CELLS)
def test_every_message_sent_in_every_state(role, state, joined):
    wrong = []
    for t in MsgType:
        c = in_state(role, state, joined)
        want = expected(role, state, joined, t, sending=True)
        assert c.may_send(t) is (want is not None)
        try:
            c.send(sample(t))
            got = c.state
        except LocalLinkError:
            got = None
            # A refused send ends the connection, unless it had ended already.
            assert c.state is (state if state in (CL, ER) else ER)
        if got is not want:
            wrong.append(f"{t.name}: {got} instead of {want}")
    assert not wrong, wrong


@pytest.mark.parametrize(("role", "state", "joined"), CELLS)
def test_every_message_received_in_every_state(role, state, joined):
    wrong = []
    for t in MsgType:
        c = in_state(role, state, joined)
        want = expected(role, state, joined, t, sending=False)
        try:
            out = c.receive_data(encode_frame_bytes(t, sample(t)))
            got = c.state if out else IGNORED
            if not out:
                assert c.state is state
            else:
                assert [type(m) for m, _ in out] == [type(sample(t))]
        except LinkError:
            got = None
            assert c.state is (state if state in (CL, ER) else ER)
        if got != want:
            wrong.append(f"{t.name}: {got} instead of {want}")
    assert not wrong, wrong


def test_the_table_in_link_py_is_the_one_written_here():
    """Every row of TRANSITIONS is a cell of the tables above (and the close rows close)."""
    for state, event, senders, after, note in TRANSITIONS:
        if event == CLOSE:
            assert after is (ER if state is ER else CL)
            continue
        for role in senders:
            if "late" not in note:
                assert SENDS[role, state].get(event) is after, (role, state, event)
            if "last word" not in note:
                other = W if role is G else G
                assert RECEIVES[other, state].get(event) is after, (other, state, event)
    assert {(s, e) for s, e, *_ in TRANSITIONS if e == CLOSE} == {(s, CLOSE) for s in State}


# ------------------------------------------------------------------------------- the close event


@pytest.mark.parametrize("how", ["close", "connection_lost"])
@pytest.mark.parametrize(("role", "state"), [(r, s) for r in Role for s in State])
def test_a_closed_connection_neither_sends_nor_receives(role, state, how):
    c = in_state(role, state, True)
    assert getattr(c, how)() is state  # handshake: no login; ready, draining: lost; closed: the end
    after = ER if state is ER else CL
    assert c.state is after and c.closed_in is state
    assert getattr(c, how)() is after and c.closed_in is state  # closing twice changes nothing
    with pytest.raises(LinkError, match="closed" if after is CL else "already failed"):
        c.receive_data(encode_frame_bytes(T.PING, Ping(1.0)))
    for t in MsgType:
        if role is G and after is ER and t in (T.REFUSE, T.GOODBYE):
            continue  # the last word
        with pytest.raises(LocalLinkError, match="closed" if after is CL else "already failed"):
            c.send(sample(t))
        assert c.state is after


def test_closing_mid_handshake_and_mid_frame():
    gw, wk = LinkConnection(Role.GATEWAY), LinkConnection(Role.WORKER)
    wk.receive_data(wire(gw.send(Challenge([1], b"n" * 32))))
    frame = wire(wk.send(hello()))
    assert gw.receive_data(frame[:20]) == []  # half a HELLO, then the worker goes away
    assert gw.connection_lost() is HS and gw.state is CL and gw.error is None  # not a protocol error
    assert wk.close() is HS and wk.state is CL
    with pytest.raises(LinkError, match="closed"):
        gw.receive_data(frame[20:])


def test_goodbye_then_the_close_is_the_expected_end_and_what_followed_it_is_not_read():
    gw, wk = logged_in()
    data = wire(wk.send(Load())) + wire(wk.send(Goodbye("drained"))) + encode_frame_bytes(T.LOAD, Load())
    assert [type(m) for m, _ in gw.receive_data(data)] == [Load, Goodbye]
    assert gw.state is CL and wk.state is CL
    assert gw.connection_lost() is CL and wk.close() is CL


# ----------------------------------------------------------------------------- joined, negotiated


def test_joined_is_negotiated_by_the_hello():
    gw, wk = logged_in_pair(joined=True)
    reqs = Requests([1, 2], [1, 1], [TensorDesc("x", "FP32", [2, 4], 32)])
    [(r, payload)] = wk.receive_data(wire(gw.send(reqs, [b"\0" * 32])))
    assert r == reqs and len(payload) == 32
    [(res, _)] = gw.receive_data(wire(wk.send(Results([1, 2], [1, 1], []))))
    assert isinstance(res, Results)
    old = LinkConnection(Role.GATEWAY)  # a worker from before ``joined``: the field is absent
    old.receive_data(encode_frame_bytes(T.HELLO, {"protocol": 1, "worker_id": "w"}))
    assert old.joined is False


def test_a_gateway_sends_no_requests_frame_to_a_worker_that_did_not_announce_joined():
    gw, wk = logged_in_pair(joined=False)
    assert gw.may_send(T.REQUEST) and not gw.may_send(T.REQUESTS)
    with pytest.raises(LocalLinkError, match="REQUESTS: the worker did not announce joined"):
        gw.send(Requests([1], [1], []))
    assert gw.state is ER
    gw, wk = logged_in_pair(joined=False)
    with pytest.raises(LinkError, match="unexpected REQUESTS: the worker did not announce joined"):
        wk.receive_data(encode_frame_bytes(T.REQUESTS, Requests([1], [1], [])))  # refused, not ignored
    assert wk.state is ER


def test_a_worker_that_did_not_announce_joined_sends_no_results_frame():
    gw, wk = logged_in_pair(joined=False)
    with pytest.raises(LocalLinkError, match="RESULTS: the worker did not announce joined"):
        wk.send(Results([1], [1], []))
    gw, wk = logged_in_pair(joined=False)
    with pytest.raises(LinkError, match="unexpected RESULTS: the worker did not announce joined"):
        gw.receive_data(encode_frame_bytes(T.RESULTS, Results([1], [1], [])))
    assert gw.state is ER


# ----------------------------------------------------------------------------------------- fuzzing

EVENTS = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(list(MsgType)), st.booleans()),
    st.tuples(st.just("receive"), st.sampled_from(list(MsgType)), st.booleans()),
    st.tuples(st.sampled_from(["close", "connection_lost"]), st.none(), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(Role)), st.lists(EVENTS, max_size=25))
def test_any_sequence_of_events_follows_the_table(role, events):
    """One end fed any sequence of sends, receives and closes moves exactly as the tables above say,
    with ``joined`` taken from whichever HELLO it sent or received."""
    c, state, joined = LinkConnection(role), HS, False
    for kind, t, hello_joined in events:
        if kind in ("close", "connection_lost"):
            assert getattr(c, kind)() is state
            state = ER if state is ER else CL
        elif kind == "send":
            want = expected(role, state, joined, t, sending=True)
            try:
                c.send(sample(t, hello_joined))
                assert want is not None, (state, t)
                state = want
                joined = hello_joined if t is T.HELLO else joined
            except LocalLinkError:
                assert want is None, (state, t)
                state = state if state in (CL, ER) else ER
        else:
            want = None if state in (CL, ER) else expected(role, state, joined, t, sending=False)
            try:
                out = c.receive_data(encode_frame_bytes(t, sample(t, hello_joined)))
                assert want is not None, (state, t)
                assert len(out) == (want != IGNORED)
                if want != IGNORED:
                    state = want
                    joined = hello_joined if t is T.HELLO else joined
            except LinkError:
                assert want is None, (state, t)
                state = state if state in (CL, ER) else ER
        assert c.state is state and c.joined is joined


PAIR_EVENTS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["gateway sends", "worker sends"]), st.sampled_from(list(MsgType))),
        st.tuples(st.sampled_from(["to worker", "to gateway"]), st.integers(1, 64)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), PAIR_EVENTS)
def test_what_one_side_may_send_the_other_accepts_whatever_crosses_on_the_way(joined, events):
    """Two logged-in ends, each sending what it likes, the bytes arriving in any cut: a message that
    ``send`` allowed is never a protocol error for the other end, DRAIN crossing REQUESTs included.
    An end that closed (GOODBYE) or failed (its own bad send) is closed: it reads nothing more."""
    gw, wk = logged_in_pair(joined)
    ends = {"gateway": gw, "worker": wk}
    pipes = {"to worker": bytearray(), "to gateway": bytearray()}
    for what, arg in events:
        if what.endswith("sends"):
            side = what.split()[0]
            c = ends[side]
            try:
                data = wire(c.send(sample(arg)))
            except LocalLinkError:
                continue
            pipes["to worker" if side == "gateway" else "to gateway"] += data
        else:
            c = ends["worker" if what == "to worker" else "gateway"]
            pipe = pipes[what]
            chunk, pipe[:] = bytes(pipe[:arg]), pipe[arg:]
            if c.state in (CL, ER):
                continue  # it closed the connection: the bytes go nowhere
            c.receive_data(chunk)  # no LinkError
