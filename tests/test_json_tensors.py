"""JSON tensor data decoded into numpy in bounded chunks: the same arrays as decoding it whole, nested
or flat, across chunk boundaries; exact counts; strict element types; strings bounded before any is
built; and, fuzzed, every input either decodes to the declared shape or fails with JsonTensorError."""

from __future__ import annotations

import json
import math

import msgspec
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.protocol.json_tensors import (
    CHUNK,
    JsonTensorError,
    decode_envelope,
    json_numbers,
    json_strings,
)
from shoal.protocol.tensors import NP_DTYPES


def raw(data) -> msgspec.Raw:
    return decode_envelope(json.dumps({"inputs": [{"data": data}]}).encode()).inputs[0].data


def test_flat_and_nested_are_the_same_tensor():
    a = json_numbers(raw([[1, 2], [3, 4]]), "FP32", NP_DTYPES["FP32"], (2, 2), "x")
    b = json_numbers(raw([1, 2, 3, 4]), "FP32", NP_DTYPES["FP32"], (2, 2), "x")
    assert a.dtype == np.float32 and a.shape == (2, 2) and np.array_equal(a, b)
    assert np.array_equal(json_numbers(raw(7), "INT64", NP_DTYPES["INT64"], (1,), "x"), [7])


@pytest.mark.parametrize("n", [CHUNK // 4 - 3, CHUNK // 2 + 1, 3 * CHUNK // 2 + 7])
def test_chunk_boundaries_change_nothing(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=n).astype(np.float32)
    text = orjson.dumps(x.reshape(-1, 1), option=orjson.OPT_SERIALIZE_NUMPY)  # nested: [[..],[..]]
    assert len(text) > CHUNK // 2
    out = json_numbers(msgspec.Raw(text), "FP32", NP_DTYPES["FP32"], (n, 1), "x")
    assert np.array_equal(out, x.reshape(-1, 1))


def test_counts_are_exact_and_more_stops_the_decoding():
    with pytest.raises(JsonTensorError, match=r"shape \[1, 4\] needs 4 elements, data has 3"):
        json_numbers(raw([1, 2, 3]), "FP32", NP_DTYPES["FP32"], (1, 4), "x")
    with pytest.raises(JsonTensorError, match="data has more"):
        json_numbers(raw([0] * (3 * CHUNK)), "FP32", NP_DTYPES["FP32"], (1, 4), "x")


@pytest.mark.parametrize(
    "dt, data, ok",
    [
        ("INT32", [1, -2], True),
        ("INT32", [1.5, 2], False),  # not silently truncated
        ("INT8", [300, 1], False),  # out of range
        ("UINT64", [2**64 - 1, 0], True),
        ("UINT8", [-1, 0], False),
        ("BOOL", [True, False], True),
        ("BOOL", [1, 0], False),  # JSON booleans only
        ("FP16", [0.5, 1], True),
        ("FP64", ["1", 2], False),
        ("FP32", [{"a": 1}, 2], False),
        ("FP32", [[], [1, 2]], False),
    ],
)
def test_element_types_are_strict(dt, data, ok):
    try:
        out = json_numbers(raw(data), dt, NP_DTYPES[dt], (2,), "x")
    except JsonTensorError as e:
        assert not ok, e
        return
    assert ok and out.dtype == NP_DTYPES[dt] and out.shape == (2,)


def test_strings_nested_and_bounded_before_any_is_built():
    out = json_strings(raw([["a", "bc"], ["é", ""]]), (2, 2), 100, "s")
    assert out.shape == (2, 2) and out.tolist() == [[b"a", b"bc"], ["é".encode(), b""]]
    with pytest.raises(JsonTensorError, match="needs 1 elements, data has 3"):
        json_strings(raw(["a", "b", "c"]), (1,), 100, "s")
    with pytest.raises(JsonTensorError) as e:
        json_strings(raw(["a"] * 201), (1,), 100, "s")
    assert e.value.status == 413 and "more than 100 strings" in str(e.value)
    # bytes(10**9) would be a gigabyte of zeros: numbers are not strings.
    with pytest.raises(JsonTensorError, match="int where a string belongs"):
        json_strings(raw([10**9]), (1,), 100, "s")


def test_the_envelope_says_what_is_wrong():
    for body, message in [(b"{not json", "malformed JSON"), (b"[]", "JSON object"),
                          (b'{"inputs": 1}', "JSON object"), (b'{"inputs": [1]}', "JSON object"),
                          (b'{"inputs": [{"data": [1,2][3]}]}', "malformed JSON")]:
        with pytest.raises(JsonTensorError, match=message):
            decode_envelope(body)
    doc = decode_envelope(b'{"id": "r", "inputs": [{"name": "x", "shape": [2], "data": [1, 2]}]}')
    assert doc.id == "r" and bytes(doc.inputs[0].data) == b"[1, 2]"
    assert len(decode_envelope(b'{"inputs": [{"name": "x"}]}').inputs[0].data) == 0  # absent


json_data = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=3),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=3), c, max_size=2),
    max_leaves=25,
)


@settings(max_examples=800, deadline=None)
@given(json_data, st.sampled_from([*NP_DTYPES, "BYTES"]), st.lists(st.integers(0, 5), max_size=3))
def test_fuzz_any_data_decodes_to_its_shape_or_fails_cleanly(data, dt, shape):
    shape = tuple(shape)
    try:
        if dt == "BYTES":
            out = json_strings(raw(data), shape, 64, "x")
        else:
            out = json_numbers(raw(data), dt, NP_DTYPES[dt], shape, "x")
    except JsonTensorError:
        return
    assert out.shape == shape and out.size == math.prod(shape)
    if dt != "BYTES" and isinstance(data, list) and all(isinstance(v, (int, float)) for v in data):
        with np.errstate(all="ignore"):
            assert np.array_equal(out.reshape(-1), np.asarray(data, dtype=NP_DTYPES[dt]), equal_nan=dt.startswith("FP"))
