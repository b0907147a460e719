"""The worker link's connection as a state machine, in the manner of h11: no sockets, no clock. Feed
it the bytes that arrived (``receive_data``) and get typed messages back; give it a message to send
(``send``) and get the bytes to write. It knows which message may come when, for the side it plays,
and refuses the rest.

States (the same names on both sides)::

    HANDSHAKE --(gateway sends WELCOME / worker receives WELCOME)--> READY
    HANDSHAKE --(REFUSE either way)--> CLOSED
    READY --(DRAIN sent or received)--> DRAINING
    READY, DRAINING --(GOODBYE sent or received)--> CLOSED
    any --(a malformed frame, a message out of place)--> ERROR

In HANDSHAKE the gateway accepts one HELLO of at most ``login_max_frame`` bytes and nothing else; the
worker accepts CHALLENGE, then WELCOME or REFUSE. In READY the gateway sends REQUEST, REQUESTS, PING,
DRAIN and GOODBYE and accepts RESULT, RESULTS, ERROR, LOAD, PONG, DRAIN and GOODBYE; the worker the
reverse (REQUESTS and RESULTS only between a gateway and a worker whose HELLO said ``joined``). Once the
gateway has sent or received DRAIN it sends no new REQUEST (``send`` refuses: a local bug), and a
worker in DRAINING still answers what it holds. A worker ignores message types it does not know
(newer gateways may send more); a gateway ignores none.

``LinkError`` (the peer broke the protocol: close the connection) and ``LocalLinkError`` (this side
tried to send what its state forbids: a bug) leave the connection in ERROR.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from shoal.protocol.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_HEADER_SIZE,
    PREFIX_SIZE,
    FrameDecoder,
    FrameError,
    encode_frame,
)
from shoal.protocol.link_messages import (
    TYPE_OF,
    Challenge,
    Drain,
    Error,
    Goodbye,
    Hello,
    Load,
    Message,
    MessageError,
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


# What each side may receive in each state.
_ACCEPTS: dict[Role, dict[State, tuple[type, ...]]] = {
    Role.GATEWAY: {
        State.HANDSHAKE: (Hello,),
        State.READY: (Result, Results, Error, Load, Pong, Drain, Goodbye),
        State.DRAINING: (Result, Results, Error, Load, Pong, Drain, Goodbye),
    },
    Role.WORKER: {
        State.HANDSHAKE: (Challenge, Welcome, Refuse),
        State.READY: (Request, Requests, Ping, Drain, Goodbye),
        State.DRAINING: (Request, Requests, Ping, Drain, Goodbye),
    },
}
# What each side may send in each state.
_SENDS: dict[Role, dict[State, tuple[type, ...]]] = {
    Role.GATEWAY: {
        State.HANDSHAKE: (Challenge, Welcome, Refuse),
        State.READY: (Request, Requests, Ping, Drain, Goodbye),
        State.DRAINING: (Ping, Drain, Goodbye),
        State.ERROR: (Refuse, Goodbye),  # a last word before closing a connection that broke the rules
    },
    Role.WORKER: {
        State.HANDSHAKE: (Hello,),
        State.READY: (Result, Results, Error, Load, Pong, Drain, Goodbye),
        State.DRAINING: (Result, Results, Error, Load, Pong, Drain, Goodbye),
    },
}


class LinkConnection:
    """One end of one worker link. ``receive_data`` returns ``(message, payload)`` pairs; the payload
    holds a REQUEST's or RESULT's tensors (empty for the others)."""

    def __init__(self, role: Role, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.role = role
        self.max_frame_size = max_frame_size
        self.state = State.HANDSHAKE
        first = LOGIN_MAX_FRAME if role is Role.GATEWAY else max_frame_size
        self._decoder = FrameDecoder(first, decode_headers=False)
        self.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE  # from the peer's HELLO or WELCOME
        self.error: str | None = None

    # -------------------------------------------------------------------------------- receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[tuple[Message, bytes | memoryview]]:
        if self.state is State.ERROR:
            raise LinkError(f"the connection already failed: {self.error}")
        try:
            frames = self._decoder.feed(data)
        except FrameError as e:
            raise self._fail(f"bad frame: {e}") from None
        out: list[tuple[Message, bytes | memoryview]] = []
        for f in frames:
            if self.state is State.CLOSED:
                break  # nothing after GOODBYE or REFUSE counts
            accepts = _ACCEPTS[self.role].get(self.state, ())
            try:
                msg = decode_header(f.type, f.raw_header)
            except MessageError as e:
                raise self._fail(f"malformed {f.type.name}: {e}") from None
            if not isinstance(msg, accepts):
                if self.role is Role.WORKER and self.state is not State.HANDSHAKE:
                    continue  # a newer gateway's message this worker does not know
                what = "before logging in" if self.state is State.HANDSHAKE else f"in state {self.state.value}"
                raise self._fail(f"unexpected {f.type.name} {what}")
            self._received(msg)
            out.append((msg, f.payload))
        return out

    def _received(self, msg: Message) -> None:
        if isinstance(msg, Welcome):
            self.state = State.READY
            if msg.max_frame_size:
                self.peer_max_frame_size = msg.max_frame_size
        elif isinstance(msg, Refuse | Goodbye):
            self.state = State.CLOSED
        elif isinstance(msg, Drain) and self.state is State.READY:
            self.state = State.DRAINING
        elif isinstance(msg, Hello) and msg.max_frame_size:
            self.peer_max_frame_size = msg.max_frame_size

    # ---------------------------------------------------------------------------------- sending

    def send(self, msg: Message, payload: Any = b"") -> list[bytes | memoryview]:
        """The bytes for ``msg`` (its payload buffers are not copied)."""
        allowed = _SENDS[self.role].get(self.state, ())
        if not isinstance(msg, allowed):
            if self.state is State.ERROR:
                raise LocalLinkError(f"the connection already failed: {self.error}")
            self.state, self.error = State.ERROR, f"cannot send {TYPE_OF[type(msg)].name} in state {self.state.value}"
            raise LocalLinkError(self.error)
        try:
            parts = encode_frame(TYPE_OF[type(msg)], msg, payload)
        except FrameError as e:
            raise LocalLinkError(str(e)) from None
        if isinstance(msg, Welcome):
            self.state = State.READY
            self._decoder.max_frame_size = self.max_frame_size  # a logged-in worker may send results
        elif isinstance(msg, Refuse | Goodbye) and self.state is not State.ERROR:
            self.state = State.CLOSED
        elif isinstance(msg, Drain) and self.state is State.READY:
            self.state = State.DRAINING
        return parts

    def _fail(self, why: str) -> LinkError:
        self.state, self.error = State.ERROR, why
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
    "Heartbeat",
    "LOGIN_MAX_FRAME",
    "Challenge",
    "Drain",
    "Error",
    "Goodbye",
    "Hello",
    "LinkConnection",
    "LinkError",
    "Load",
    "LocalLinkError",
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
