"""The worker link's wire format, as a pure codec: bytes in, frames out, no sockets.

One frame::

    +-----------+---------+--------+--------------+----------------------+-------------------+
    | length u32| version | type u8| hlen u32     | header (msgpack map) | payload (raw)     |
    | (big end.)| u8      |        | (big endian) | hlen bytes           | length-6-hlen     |
    +-----------+---------+--------+--------------+----------------------+-------------------+

``length`` counts everything after itself. The header is a small msgpack map (ids, tensor names,
datatypes, shapes, load figures); the payload carries tensor contents as raw buffers, one after the
other in the order the header lists them, so a tensor crosses the link without per-element encoding.

Limits (every size read from the network is checked before anything is allocated):

* ``max_frame_size`` (default 64 MiB): a frame is one request or one result. The brief's largest
  payload is a 3 MB image; 64 MiB leaves room for batched tensors while keeping a hostile peer from
  making us buffer gigabytes. Operators raise it with ``--max-frame-mb``.
* ``MAX_HEADER_SIZE`` (64 KiB): headers describe tensors, they never carry them; 64 KiB is a
  thousand tensor specs. Same order as HTTP servers' header limits (h11 caps headers at 16 KiB).
* msgpack limits inside the header (container lengths, string and binary lengths) are bounded by the
  header size itself, and the decoded header must be a map.

Modelled on h11: the decoder is a small state holder fed with bytes; it raises ``FrameError`` on the
first malformed byte and stays unusable after (the connection must be closed).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgspec

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
MAX_HEADER_SIZE = 64 * 1024

_PREFIX = struct.Struct("!IBBI")  # length, version, type, header length
PREFIX_SIZE = _PREFIX.size  # 10
_FIXED_AFTER_LENGTH = PREFIX_SIZE - 4


class MsgType(IntEnum):
    CHALLENGE = 1  # gateway -> worker, first frame on a connection: a nonce to prove the secret on
    HELLO = 2  # worker -> gateway: login proof and registration (model, version, capacity, specs)
    WELCOME = 3  # gateway -> worker: accepted; heartbeat period and dead-peer timeout
    REFUSE = 4  # gateway -> worker: refused, with a reason; the gateway closes after it
    REQUEST = 5  # gateway -> worker: one inference request
    RESULT = 6  # worker -> gateway: outputs of one request
    ERROR = 7  # worker -> gateway: one request failed, with a reason
    LOAD = 8  # worker -> gateway, every second: load report (doubles as the worker's heartbeat)
    PING = 9  # gateway -> worker heartbeat
    PONG = 10  # worker -> gateway answer to PING
    DRAIN = 11  # worker -> gateway: send nothing new; I finish what I hold, then say GOODBYE
    GOODBYE = 12  # either side: closing on purpose
    REQUESTS = 13  # gateway -> worker: several alike requests, their tensors joined (``joined.py``)
    RESULTS = 14  # worker -> gateway: the outputs of one REQUESTS, joined the same way
    PEERS = 15  # gateway -> worker: where every gateway of the cluster takes workers
    CANCEL = 16  # gateway -> worker: requests whose clients left; drop those not yet running


_TYPES = {int(t): t for t in MsgType}  # a dict lookup is several times faster than MsgType(n)


class FrameError(ValueError):
    """The peer sent bytes that are not a valid frame; the connection must be closed."""


@dataclass(slots=True)
class Frame:
    type: MsgType
    header: Any  # the header as a map; None when the decoder leaves it to a typed decoder (raw_header)
    payload: bytes | memoryview = b""
    raw_header: bytes = b""


_encoder = msgspec.msgpack.Encoder()
_map_decoder = msgspec.msgpack.Decoder(dict)


def encode_frame(
    msg_type: MsgType,
    header: Any,
    payload: bytes | memoryview | list[bytes | memoryview] = b"",
    version: int = PROTOCOL_VERSION,
) -> list[bytes | memoryview]:
    """Encode one frame as a list of buffers to write in order (payload buffers are not copied). The
    header is a map or a message structure (``link_messages``), encoded as a MessagePack map."""
    hdr = _encoder.encode(header)
    if len(hdr) > MAX_HEADER_SIZE:
        raise FrameError(f"header of {len(hdr)} bytes exceeds the {MAX_HEADER_SIZE} byte limit")
    parts = payload if isinstance(payload, list) else [payload]
    plen = sum(len(p) for p in parts)
    prefix = _PREFIX.pack(_FIXED_AFTER_LENGTH + len(hdr) + plen, version, int(msg_type), len(hdr))
    return [prefix + hdr, *[p for p in parts if len(p)]]


def encode_frame_bytes(
    msg_type: MsgType, header: Any, payload: bytes | list[bytes | memoryview] = b""
) -> bytes:
    return b"".join(encode_frame(msg_type, header, payload))


class FrameDecoder:
    """Feed bytes with ``feed``; get complete frames back. Raises ``FrameError`` on bad input.

    With ``decode_headers`` (the default) each header is decoded into a map here; without, it is left
    as bytes in ``raw_header`` for a typed decoder (the link's state machine does that)."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, decode_headers: bool = True) -> None:
        self.max_frame_size = max_frame_size
        self.decode_headers = decode_headers
        self._buf = bytearray()
        self._broken = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._broken:
            raise FrameError("decoder already failed; close the connection")
        if not self._buf and type(data) is bytes:
            # Nothing held from before, and bytes cannot change: the frames' payloads are views of
            # ``data``, not copies (under load a read holds dozens of whole frames); only a frame cut
            # by the end of the read is kept for the next.
            frames, pos = self._parse(data, memoryview(data), copy=False)
            if pos < len(data):
                self._buf += memoryview(data)[pos:]
            return frames
        buf = self._buf
        buf += data
        view = memoryview(buf)  # slices of a view are copied once (``bytes(buf[a:b])`` copies twice)
        try:
            frames, pos = self._parse(buf, view, copy=True)
        finally:
            view.release()  # the buffer cannot shrink while a view of it is held
        if pos:
            del buf[:pos]
        return frames

    def _parse(self, buf: bytes | bytearray, view: memoryview, copy: bool) -> tuple[list[Frame], int]:
        """The whole frames at the start of ``buf``, and where the first incomplete one begins."""
        frames: list[Frame] = []
        pos = 0
        n = len(buf)
        try:
            while n - pos >= PREFIX_SIZE:
                length, version, mtype, hlen = _PREFIX.unpack_from(buf, pos)
                if version not in SUPPORTED_VERSIONS:
                    raise FrameError(
                        f"unsupported protocol version {version} (this side speaks {SUPPORTED_VERSIONS})"
                    )
                if length < _FIXED_AFTER_LENGTH or length > self.max_frame_size:
                    raise FrameError(f"frame length {length} outside [6, {self.max_frame_size}]")
                if hlen > MAX_HEADER_SIZE or hlen > length - _FIXED_AFTER_LENGTH:
                    raise FrameError(f"header length {hlen} invalid for a frame of {length} bytes")
                mt = _TYPES.get(mtype)
                if mt is None:
                    raise FrameError(f"unknown message type {mtype}")
                end = pos + 4 + length
                if end > n:
                    break
                hstart = pos + PREFIX_SIZE
                raw = bytes(view[hstart : hstart + hlen])
                header = None
                if self.decode_headers:
                    try:
                        header = _map_decoder.decode(raw)
                    except msgspec.DecodeError as e:
                        raise FrameError(f"malformed frame header (it must be a map): {e}") from None
                payload = view[hstart + hlen : end]
                frames.append(Frame(mt, header, bytes(payload) if copy else payload, raw))
                pos = end
        except FrameError:
            self._broken = True
            self._buf = bytearray()
            raise
        return frames, pos
