"""The worker-link codec: round trips, byte-by-byte feeding, limits, and fuzzed garbage."""

import struct

import msgpack
import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.protocol.frames import (
    MAX_HEADER_SIZE,
    PREFIX_SIZE,
    FrameDecoder,
    FrameError,
    MsgType,
    encode_frame_bytes,
)
from shoal.protocol.link_messages import TensorDesc, decode_header
from shoal.protocol.tensors import TensorError, pack_tensors, unpack_tensors


def test_round_trip_with_tensors():
    arrays = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.array([1, 2, 3], dtype=np.int64),
        "s": np.array([b"hello", b"", b"\x00\xff"], dtype=object),
    }
    specs, bufs = pack_tensors(arrays)
    wire = encode_frame_bytes(MsgType.REQUEST, {"id": 7, "inputs": specs}, bufs)
    frames = FrameDecoder().feed(wire)
    assert len(frames) == 1 and frames[0].type is MsgType.REQUEST and frames[0].header["id"] == 7
    req = decode_header(MsgType.REQUEST, frames[0].raw_header)  # as the link's state machine reads it
    out = unpack_tensors(req.inputs, frames[0].payload)
    np.testing.assert_array_equal(out["a"], arrays["a"])
    np.testing.assert_array_equal(out["b"], arrays["b"])
    assert list(out["s"]) == [b"hello", b"", b"\x00\xff"]


def test_fed_one_byte_at_a_time_and_many_frames_at_once():
    wire = b"".join(encode_frame_bytes(MsgType.LOAD, {"n": i}, b"x" * i) for i in range(20))
    dec = FrameDecoder()
    got = []
    for i in range(len(wire)):
        got += dec.feed(wire[i : i + 1])
    assert [f.header["n"] for f in got] == list(range(20))
    assert [len(f.payload) for f in got] == list(range(20))
    assert [f.header["n"] for f in FrameDecoder().feed(wire)] == list(range(20))
    assert dec.buffered == 0


def test_oversized_frame_refused_before_buffering():
    dec = FrameDecoder(max_frame_size=1000)
    prefix = struct.pack("!IBBI", 10_000_000, 1, int(MsgType.REQUEST), 2)
    with pytest.raises(FrameError, match="frame length"):
        dec.feed(prefix)
    with pytest.raises(FrameError):  # a broken decoder stays broken
        dec.feed(b"")


@pytest.mark.parametrize(
    "prefix, match",
    [
        (struct.pack("!IBBI", 20, 9, 5, 2), "protocol version"),
        (struct.pack("!IBBI", 20, 1, 99, 2), "unknown message type"),
        (struct.pack("!IBBI", 20, 1, 5, 30), "header length"),
        (struct.pack("!IBBI", 2, 1, 5, 0), "frame length"),
        (struct.pack("!IBBI", 10**6, 1, 5, MAX_HEADER_SIZE + 1), "header length"),
    ],
)
def test_bad_prefixes(prefix, match):
    with pytest.raises(FrameError, match=match):
        FrameDecoder().feed(prefix + b"\x00" * 30)


def test_header_must_be_a_map():
    hdr = msgpack.packb([1, 2])
    wire = struct.pack("!IBBI", 6 + len(hdr), 1, int(MsgType.PING), len(hdr)) + hdr
    with pytest.raises(FrameError, match="map"):
        FrameDecoder().feed(wire)


def test_tensor_sizes_must_agree():
    specs, bufs = pack_tensors({"a": np.zeros((2, 2), np.float32)})
    wrong = [msgspec.structs.replace(specs[0], shape=[3, 2])]
    with pytest.raises(TensorError):
        unpack_tensors(wrong, b"".join(bytes(b) for b in bufs))
    with pytest.raises(TensorError, match="not claimed"):
        unpack_tensors(specs, b"".join(bytes(b) for b in bufs) + b"extra")
    with pytest.raises(TensorError):
        unpack_tensors([TensorDesc("x", "BYTES", [2], 4)], b"\x09\x00\x00\x00")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_never_crash(data):
    dec = FrameDecoder(max_frame_size=4096)
    try:
        for f in dec.feed(data):
            assert isinstance(f.header, dict)
    except FrameError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20), max_size=5),
    st.binary(max_size=300),
    st.integers(1, 50),
)
def test_fuzz_valid_frames_survive_any_split(header, payload, cut):
    wire = encode_frame_bytes(MsgType.RESULT, header, payload) * 2
    dec = FrameDecoder()
    frames = []
    for i in range(0, len(wire), cut):
        frames += dec.feed(wire[i : i + cut])
    assert len(frames) == 2 and all(f.header == header and f.payload == payload for f in frames)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 600))
def test_fuzz_truncated_and_corrupted_tensor_payloads(junk, pos):
    specs, bufs = pack_tensors(
        {"a": np.arange(6, dtype=np.int32), "s": np.array([b"ab", b"cde"], dtype=object)}
    )
    payload = bytearray(b"".join(bytes(b) for b in bufs))
    payload[pos % (len(payload) + 1) :] = junk[:10]
    try:
        unpack_tensors(specs, bytes(payload))
    except TensorError:
        pass


def test_prefix_size_is_documented_size():
    assert PREFIX_SIZE == 10
