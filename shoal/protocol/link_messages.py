"""The worker link's messages, each declared once as a typed structure (msgspec): the frame's header
is the structure encoded as a MessagePack map, field names as below, so the wire is what it was when
these were plain maps (protocol version 1). Decoding validates types and names the field on error
(``HELLO: Expected `int`, got `str` - at `$.capacity```).

Frame type numbers and the frame layout are in ``frames.py``; which message may come when is in
``link.py``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shoal.protocol.frames import MsgType
from shoal.protocol.interface import ModelInterface, TensorSpec


class TensorDesc(msgspec.Struct, frozen=True, omit_defaults=True):
    """A tensor in a header; its bytes follow in the payload, in header order."""

    name: str
    datatype: str
    shape: list[int]
    size: int = 0


class Challenge(msgspec.Struct, frozen=True):
    versions: list[int]
    nonce: bytes
    gateway: str = ""  # the cluster's name
    gateway_id: str = ""  # this gateway among the cluster's: a worker keeps one link to each


class Hello(msgspec.Struct, frozen=True, omit_defaults=True):
    # Only the version is required to decode: a worker of another protocol version is refused by
    # the gateway with a reason that says so, whatever else its HELLO holds.
    protocol: int
    worker_id: str = ""
    proof: bytes = b""
    model: str = ""
    model_version: str = ""
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    runtime: str = ""
    device: str = "cpu"
    capacity: int = 1
    max_batch_size: int = 0
    batch_delay_ms: float = 0.0
    image_input: str | None = None
    labels: dict[str, list[str]] = {}
    pid: int | None = None
    host: str | None = None
    max_frame_size: int | None = None
    # This worker takes REQUESTS (several requests in one frame) and answers them with RESULTS.
    # Gateways that do not know the field ignore it, and send it REQUEST frames only.
    joined: bool = False
    # This worker links to every gateway of its cluster and divides its capacity between them: the
    # ``capacity`` of its LOAD reports is this gateway's share, which may change.
    shares: bool = False
    # This worker takes CANCEL: a request not yet running whose client left is dropped (answered
    # ERROR 499). Gateways that do not know the field never send it.
    cancels: bool = False

    def interface(self) -> ModelInterface:
        """The model version this worker serves, as it announced it."""
        return ModelInterface(
            self.model,
            self.model_version,
            tuple(self.inputs),
            tuple(self.outputs),
            self.max_batch_size,
            self.image_input,
            dict(self.labels),
            self.runtime,
            self.batch_delay_ms,
        )


def announce(iface: ModelInterface) -> dict[str, Any]:
    """A model's interface as HELLO's fields (their wire names, as they were in protocol version 1)."""
    return {
        "model": iface.name,
        "model_version": iface.version,
        "inputs": list(iface.inputs),
        "outputs": list(iface.outputs),
        "runtime": iface.runtime,
        "max_batch_size": iface.max_batch_size,
        "batch_delay_ms": iface.batch_delay_ms,
        "image_input": iface.image_input,
        "labels": iface.labels,
    }


class Welcome(msgspec.Struct, frozen=True, omit_defaults=True):
    version: int
    gateway: str = ""  # the cluster's name
    heartbeat_s: float = 1.0
    dead_after_s: float = 5.0
    max_frame_size: int | None = None


class Peers(msgspec.Struct, frozen=True):
    """The addresses (host:port) workers reach every gateway of the cluster at, as this gateway knows
    them, itself included: sent after WELCOME and whenever the set changes. A worker links to each;
    one that does not know the message ignores it."""

    gateways: list[str]


class Cancel(msgspec.Struct, frozen=True):
    """Requests whose clients left: the worker drops those not yet in a running batch, answering
    each ERROR 499, and runs the others as usual (their answers are dropped at the gateway). Sent
    only to a worker whose HELLO said ``cancels``."""

    ids: list[int]


class Refuse(msgspec.Struct, frozen=True, omit_defaults=True):
    reason: str
    retry_after_s: float | None = None


class Request(msgspec.Struct, frozen=True, omit_defaults=True):
    id: int
    inputs: list[TensorDesc]
    outputs: list[str] | None = None
    rid: str | None = None  # the device's request id, for the worker's logs


class Result(msgspec.Struct, frozen=True, omit_defaults=True):
    id: int
    outputs: list[TensorDesc]
    compute_ms: float | None = None  # the model's time on the batch the request ran in
    batch: int = 0  # rows of the batch the request ran in
    # Where else the worker's time went, for the gateway's statistics (Triton's queue, compute_input
    # and compute_output). Optional, added within protocol version 1: a gateway that does not know
    # them ignores them, and one that does counts nothing when a worker leaves them out.
    queue_ms: float | None = None  # from its arrival in the worker to the start of its batch
    input_ms: float | None = None  # decoding its inputs (images) and joining the batch's
    output_ms: float | None = None  # cutting the batch's outputs into each request's


class Requests(msgspec.Struct, frozen=True, omit_defaults=True):
    """Several requests in one frame: each input is the requests' tensors joined along the first
    dimension, in the order of ``ids``; ``rows[i]`` of them belong to ``ids[i]``."""

    ids: list[int]
    rows: list[int]
    inputs: list[TensorDesc]
    outputs: list[str] | None = None
    rids: list[str | None] = []  # the devices' request ids, for the worker's logs (empty: none)


class Results(msgspec.Struct, frozen=True, omit_defaults=True):
    """The outputs of one REQUESTS, joined the same way (``rows[i]`` rows of each are ``ids[i]``'s)."""

    ids: list[int]
    rows: list[int]
    outputs: list[TensorDesc]
    compute_ms: float | None = None
    batch: int = 0
    queue_ms: float | None = None  # as RESULT's, the same for every request of the frame
    input_ms: float | None = None
    output_ms: float | None = None


class Error(msgspec.Struct, frozen=True):
    id: int
    error: str
    status: int = 500


class Load(msgspec.Struct, frozen=True, omit_defaults=True):
    in_flight: int = 0
    queued: int = 0
    capacity: int = 0
    served: int = 0
    batches: int = 0
    rows: int = 0
    busy_s: float = 0.0
    cpu_s: float | None = None
    draining: bool = False
    links: int = 1  # gateways this worker is linked to now
    unreached: list[str] = []  # gateways it knows of and cannot reach (their worker addresses)


class Ping(msgspec.Struct, frozen=True):
    t: float | None = None


class Pong(msgspec.Struct, frozen=True):
    t: float | None = None


class Drain(msgspec.Struct, frozen=True):
    pass


class Goodbye(msgspec.Struct, frozen=True, omit_defaults=True):
    reason: str = ""


Message = (
    Challenge
    | Hello
    | Welcome
    | Refuse
    | Request
    | Result
    | Error
    | Load
    | Ping
    | Pong
    | Drain
    | Goodbye
    | Requests
    | Results
    | Peers
    | Cancel
)

TYPE_OF: dict[type, MsgType] = {
    Challenge: MsgType.CHALLENGE,
    Hello: MsgType.HELLO,
    Welcome: MsgType.WELCOME,
    Refuse: MsgType.REFUSE,
    Request: MsgType.REQUEST,
    Result: MsgType.RESULT,
    Error: MsgType.ERROR,
    Load: MsgType.LOAD,
    Ping: MsgType.PING,
    Pong: MsgType.PONG,
    Drain: MsgType.DRAIN,
    Goodbye: MsgType.GOODBYE,
    Requests: MsgType.REQUESTS,
    Results: MsgType.RESULTS,
    Peers: MsgType.PEERS,
    Cancel: MsgType.CANCEL,
}
DECODERS: dict[MsgType, msgspec.msgpack.Decoder[Any]] = {
    t: msgspec.msgpack.Decoder(c) for c, t in TYPE_OF.items()
}
ENCODER = msgspec.msgpack.Encoder()


class MessageError(ValueError):
    """A header that does not match its message's declaration; the text names the field."""


def decode_header(mtype: MsgType, header: bytes | memoryview) -> Message:
    try:
        return DECODERS[mtype].decode(header)
    except msgspec.DecodeError as e:
        raise MessageError(f"{mtype.name}: {e}") from None


def encode_header(msg: Message) -> bytes:
    return ENCODER.encode(msg)
