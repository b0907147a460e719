"""The worker link's connection as a state machine, in the manner of h11: no sockets, no clock. Feed
it the bytes that arrived (``receive_data``) and get typed messages back; give it a message to send
(``send``) and get the bytes to write; tell it when the connection closes (``close`` when this side
closes it, ``connection_lost`` when the peer did or the network broke it). It knows which message may
come when, for the side it plays, and refuses the rest.

Every rule is one row of ``TRANSITIONS`` below: in this state, this message, sent by this side, leads
to that state. The sending side may send what its rows allow; the receiving side accepts what the
other side's rows allow, in its own state. Both paths look the rows up in the same compiled form (a
dict per role, state and joined-ness, keyed by message type). Notes on a row:

* ``joined``: only on a link whose worker said ``joined: true`` in its HELLO (the machine learns it
  from the HELLO it sends or receives): REQUESTS and RESULTS.
* ``late``: received, never sent. A worker that sent DRAIN still takes the REQUEST frames the gateway
  sent before it read that DRAIN; the gateway, once draining, sends none.
* ``last word``: sent, never received. A gateway may tell a peer that broke the rules why (REFUSE) or
  say GOODBYE before it closes the connection.

Besides: a worker, once logged in, ignores messages the table does not give it (a newer gateway may
send more), except REQUESTS on a link that did not negotiate ``joined`` (refused); a gateway ignores
none. The frames that came in the same read after a GOODBYE or REFUSE are not read.

The close event (``close`` or ``connection_lost``) is a row too: from handshake it means the login
did not happen, from ready or draining that the link was lost without a GOODBYE (the gateway sends
what the worker held elsewhere), from closed that the expected end came (after GOODBYE or REFUSE);
all lead to closed. Closing a connection in error keeps it in error. A frame cut by the close is
dropped.

``LinkError`` (the peer broke the protocol: close the connection) and ``LocalLinkError`` (this side
tried to send what its state forbids: a bug) leave the connection in ERROR. In CLOSED or ERROR
nothing more is received (``receive_data`` raises ``LinkError``) or sent (``send`` raises
``LocalLinkError``; but for a gateway's last word in ERROR), and the state stays as it is.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Final

from shoal.protocol.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_HEADER_SIZE,
    PREFIX_SIZE,
    FrameDecoder,
    FrameError,
    MsgType,
    encode_frame,
)
from shoal.protocol.link_messages import (
    TYPE_OF,
    Cancel,
    Challenge,
    Drain,
    Error,
    Goodbye,
    Hello,
    Load,
    Message,
    MessageError,
    Peers,
    Ping,
    Pong,
    Refuse,
    Request,
    Requests,
    Result,
    Results,
    Welcome,
    decode_header,
)

LOGIN_MAX_FRAME = PREFIX_SIZE + MAX_HEADER_SIZE  # a HELLO, the only frame a stranger may send


class Role(Enum):
    GATEWAY = "gateway"
    WORKER = "worker"


class State(Enum):
    HANDSHAKE = "handshake"
    READY = "ready"
    DRAINING = "draining"
    CLOSED = "closed"
    ERROR = "error"


class LinkError(Exception):
    """The peer sent something this side must not accept; close the connection."""


class LocalLinkError(Exception):
    """This side tried to send a message its state forbids."""


CLOSE: Final = "close"  # the close event's name in the table: not a message, never on the wire

_G, _W = (Role.GATEWAY,), (Role.WORKER,)
_BOTH = (Role.GATEWAY, Role.WORKER)
_HS, _RD, _DR, _CL, _ER = State.HANDSHAKE, State.READY, State.DRAINING, State.CLOSED, State.ERROR
M = MsgType

# The protocol: (state, message or CLOSE, sent by, state after, note). See the module's docstring.
TRANSITIONS: tuple[tuple[State, MsgType | str, tuple[Role, ...], State, str], ...] = (
    (_HS, M.CHALLENGE, _G, _HS, ""),
    (_HS, M.HELLO, _W, _HS, ""),  # it says whether the link is joined
    (_HS, M.WELCOME, _G, _RD, ""),
    (_HS, M.REFUSE, _G, _CL, ""),
    (_HS, CLOSE, _BOTH, _CL, ""),  # the login did not happen
    (_RD, M.REQUEST, _G, _RD, ""),
    (_RD, M.REQUESTS, _G, _RD, "joined"),
    (_RD, M.PING, _G, _RD, ""),
    (_RD, M.PEERS, _G, _RD, ""),
    (_RD, M.CANCEL, _G, _RD, ""),  # only to a worker whose HELLO said cancels
    (_RD, M.RESULT, _W, _RD, ""),
    (_RD, M.RESULTS, _W, _RD, "joined"),
    (_RD, M.ERROR, _W, _RD, ""),
    (_RD, M.LOAD, _W, _RD, ""),
    (_RD, M.PONG, _W, _RD, ""),
    (_RD, M.DRAIN, _BOTH, _DR, ""),
    (_RD, M.GOODBYE, _BOTH, _CL, ""),
    (_RD, CLOSE, _BOTH, _CL, ""),  # lost without a GOODBYE
    (_DR, M.REQUEST, _G, _DR, "late"),
    (_DR, M.REQUESTS, _G, _DR, "joined late"),
    (_DR, M.PING, _G, _DR, ""),
    (_DR, M.PEERS, _G, _DR, ""),
    (_DR, M.CANCEL, _G, _DR, ""),
    (_DR, M.RESULT, _W, _DR, ""),
    (_DR, M.RESULTS, _W, _DR, "joined"),
    (_DR, M.ERROR, _W, _DR, ""),
    (_DR, M.LOAD, _W, _DR, ""),
    (_DR, M.PONG, _W, _DR, ""),
    (_DR, M.DRAIN, _BOTH, _DR, ""),
    (_DR, M.GOODBYE, _BOTH, _CL, ""),
    (_DR, CLOSE, _BOTH, _CL, ""),  # lost without a GOODBYE
    (_CL, CLOSE, _BOTH, _CL, ""),  # the expected end
    (_ER, M.REFUSE, _G, _ER, "last word"),
    (_ER, M.GOODBYE, _G, _ER, "last word"),
    (_ER, CLOSE, _BOTH, _ER, ""),
)


class _Rules:
    """The table's rows for one role, state and joined-ness, as the hot paths read them."""

    __slots__ = ("sends", "receives", "ignores_others", "joined_only", "close")

    def __init__(self, role: Role, state: State, joined: bool) -> None:
        self.sends: dict[MsgType, State] = {}
        self.receives: dict[MsgType, State] = {}
        self.joined_only: set[MsgType] = set()  # in the table, but this link did not negotiate joined
        self.close = state
        for s, event, senders, after, note in TRANSITIONS:
            if s is not state:
                continue
            if event == CLOSE:
                self.close = after
                continue
            assert isinstance(event, MsgType)
            if "joined" in note and not joined:
                self.joined_only.add(event)
                continue
            if role in senders and "late" not in note:
                self.sends[event] = after
            if any(r is not role for r in senders) and "last word" not in note:
                self.receives[event] = after
        # A newer gateway may send a logged-in worker more than it knows.
        self.ignores_others = role is Role.WORKER and state in (State.READY, State.DRAINING)


_RULES: dict[tuple[Role, State, bool], _Rules] = {
    (role, state, joined): _Rules(role, state, joined)
    for role in Role
    for state in State
    for joined in (False, True)
}


class LinkConnection:
    """One end of one worker link. ``receive_data`` returns ``(message, payload)`` pairs; the payload
    holds a REQUEST's or RESULT's tensors (empty for the others)."""

    def __init__(self, role: Role, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.role = role
        self.max_frame_size = max_frame_size
        first = LOGIN_MAX_FRAME if role is Role.GATEWAY else max_frame_size
        self._decoder = FrameDecoder(first, decode_headers=False)
        self.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE  # from the peer's HELLO or WELCOME
        self.joined = False  # REQUESTS and RESULTS allowed: the worker's HELLO said so
        self.error: str | None = None
        self.closed_in: State | None = None  # the state the close event found
        self._enter(State.HANDSHAKE)

    def _enter(self, state: State) -> None:
        if state is State.READY and self._decoder.max_frame_size < self.max_frame_size:
            self._decoder.max_frame_size = self.max_frame_size  # a logged-in worker may send results
        self.state = state
        rules = _RULES[self.role, state, self.joined]
        self._rules = rules
        self._sends = rules.sends
        self._receives = rules.receives

    def may_send(self, mtype: MsgType) -> bool:
        """Whether ``send`` takes this message type now (for frames an adapter encodes itself)."""
        return mtype in self._sends

    # -------------------------------------------------------------------------------- receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[tuple[Message, bytes | memoryview]]:
        if self.state is _ER or self.state is _CL:  # module names: an Enum attribute costs 40 ns
            raise LinkError(self._ended())
        try:
            frames = self._decoder.feed(data)
        except FrameError as e:
            raise self._fail(f"bad frame: {e}") from None
        out: list[tuple[Message, bytes | memoryview]] = []
        receives = self._receives
        for f in frames:
            after = receives.get(f.type)
            if after is None:
                if self._rules.ignores_others and f.type not in self._rules.joined_only:
                    continue  # a newer gateway's message this worker does not know
                raise self._fail(self._why_not(f.type, "unexpected"))
            try:
                msg = decode_header(f.type, f.raw_header)
            except MessageError as e:
                raise self._fail(f"malformed {f.type.name}: {e}") from None
            out.append((msg, f.payload))
            if after is not self.state or after is _HS:
                self._received(msg, after)
                if after is _CL:
                    break  # nothing after GOODBYE or REFUSE counts
                receives = self._receives
        return out

    def _received(self, msg: Message, after: State) -> None:
        if isinstance(msg, Hello):
            self.joined = msg.joined
            if msg.max_frame_size:
                self.peer_max_frame_size = msg.max_frame_size
        elif isinstance(msg, Welcome) and msg.max_frame_size:
            self.peer_max_frame_size = msg.max_frame_size
        self._enter(after)

    # ---------------------------------------------------------------------------------- sending

    def send(self, msg: Message, payload: Any = b"") -> list[bytes | memoryview]:
        """The bytes for ``msg`` (its payload buffers are not copied)."""
        mtype = TYPE_OF[type(msg)]
        after = self._sends.get(mtype)
        if after is None:
            if self.state is _ER or self.state is _CL:
                raise LocalLinkError(f"cannot send {mtype.name}: {self._ended()}")
            self.error = self._why_not(mtype, "cannot send")
            self._enter(State.ERROR)  # as in h11: a local protocol error ends the connection
            raise LocalLinkError(self.error)
        try:
            parts = encode_frame(mtype, msg, payload)
        except FrameError as e:  # this message does not fit a frame; the connection is unharmed
            raise LocalLinkError(str(e)) from None
        if after is not self.state or after is _HS:
            if isinstance(msg, Hello):
                self.joined = msg.joined
            self._enter(after)
        return parts

    # ---------------------------------------------------------------------------------- closing

    def close(self) -> State:
        """This side closes the connection. Returns the state it was in (see ``connection_lost``)."""
        return self._close()

    def connection_lost(self) -> State:
        """The peer closed the connection, or the network broke it. Returns the state it was in:
        HANDSHAKE (the login did not happen), READY or DRAINING (lost without a GOODBYE), CLOSED (the
        expected end, after GOODBYE or REFUSE) or ERROR (it had failed)."""
        return self._close()

    def _close(self) -> State:
        before = self.state
        if self.closed_in is None:
            self.closed_in = before
        self._enter(self._rules.close)
        return before

    # ----------------------------------------------------------------------------------- errors

    def _why_not(self, mtype: MsgType, what: str) -> str:
        if mtype in self._rules.joined_only:
            return f"{what} {mtype.name}: the worker did not announce joined in its HELLO"
        where = "before logging in" if self.state is State.HANDSHAKE else f"in state {self.state.value}"
        return f"{what} {mtype.name} {where}"

    def _ended(self) -> str:
        if self.state is State.ERROR:
            return f"the connection already failed: {self.error}"
        return "the connection is closed"

    def _fail(self, why: str) -> LinkError:
        self.error = why
        self._enter(State.ERROR)
        return LinkError(why)


class Heartbeat:
    """When the peer was last heard from, and whether it is silent for too long (the adapter passes
    the clock; a LOAD, a PONG or any frame counts)."""

    def __init__(self, dead_after_s: float, now: float) -> None:
        self.dead_after_s = dead_after_s
        self.last_seen = now

    def seen(self, now: float) -> None:
        self.last_seen = now

    def silent_for(self, now: float) -> float:
        return now - self.last_seen

    def dead(self, now: float) -> bool:
        return self.silent_for(now) > self.dead_after_s


__all__ = [
    "CLOSE",
    "Heartbeat",
    "LOGIN_MAX_FRAME",
    "TRANSITIONS",
    "Cancel",
    "Challenge",
    "Drain",
    "Error",
    "Goodbye",
    "Hello",
    "LinkConnection",
    "LinkError",
    "Load",
    "LocalLinkError",
    "Peers",
    "Ping",
    "Pong",
    "Refuse",
    "Request",
    "Requests",
    "Result",
    "Results",
    "Role",
    "State",
    "Welcome",
]
