"""Open Inference Protocol parsing: JSON, binary extension, raw body, validation against a model."""

import json

import msgspec
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.modelrepo.manifest import TensorSpec
from shoal.protocol.oip import (
    ProtocolError,
    bind_inputs,
    build_infer_request,
    encode_infer_response,
    parse_infer_request,
    parse_infer_response,
    parse_path,
)
from shoal.protocol.tensors import TensorError

SPEC = (TensorSpec("x", "FP32", (-1, 4)),)


def test_paths():
    assert parse_path("/v2/health/live").kind == "live"
    assert parse_path("/v2").kind == "server"
    r = parse_path("/v2/models/mnist-cnn/versions/3/infer")
    assert (r.kind, r.model, r.version) == ("infer", "mnist-cnn", "3")
    r = parse_path("/v2/models/m/ready")
    assert (r.kind, r.model, r.version) == ("model_ready", "m", None)
    assert parse_path("/v2/models/m").kind == "model"
    assert parse_path("/v2/models/m/versions/2").version == "2"
    for bad in ["/", "/v2/models/", "/v2/models/m/bogus", "/v3"]:
        assert parse_path(bad) is None
    with pytest.raises(ProtocolError, match="invalid model version ''"):  # an empty version is no version
        parse_path("/v2/models/m/versions//infer")


def test_json_request():
    body = orjson.dumps(
        {"id": "r1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": list(range(8))}]}
    )
    req = parse_infer_request(body, None)
    assert req.id == "r1"
    arrays = bind_inputs(req, SPEC, None, 8)
    assert arrays["x"].dtype == np.float32 and arrays["x"].shape == (2, 4)


def test_binary_request_and_response_round_trip():
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    body, hl = build_infer_request({"x": x})
    req = parse_infer_request(body, hl)
    np.testing.assert_array_equal(bind_inputs(req, SPEC, None, 8)["x"], x)
    out, ohl = encode_infer_response("m", "1", None, {"y": x * 2}, req.outputs, req.binary_output)
    assert ohl is not None
    _, arrays = parse_infer_response(out, ohl)
    np.testing.assert_array_equal(arrays["y"], x * 2)


def test_raw_request_binds_to_single_input():
    x = np.arange(8, dtype=np.float32)
    req = parse_infer_request(x.tobytes(), 0)
    arr = bind_inputs(req, SPEC, None, 8)["x"]
    assert arr.shape == (2, 4)
    req = parse_infer_request(b"\x89PNG....", 0)
    img = bind_inputs(req, (TensorSpec("image", "FP32", (-1, 1, 28, 28)),), "image", 8)["image"]
    assert img.dtype == object and img[0] == b"\x89PNG...."


@pytest.mark.parametrize(
    "body, hl, spec_error",
    [
        (b"{not json", None, "malformed JSON"),
        (b"[]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty"),
        (
            orjson.dumps(
                {"inputs": [{"name": "x", "datatype": "FP99", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
            ),
            None,
            "datatype",
        ),
        (
            orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3]}]}),
            None,
            "needs 4 elements",
        ),
        (
            orjson.dumps(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ["a", "b", "c", "d"]}]}
            ),
            None,
            "not FP32",
        ),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "datatype": "FP32",
                            "shape": [1, 4],
                            "parameters": {"binary_data_size": 16},
                        }
                    ]
                }
            )
            + b"\x00" * 8,
            95,
            "binary_data_size",
        ),
        (b'{"inputs": 1}', 99, "outside the body"),
    ],
)
def test_malformed_requests_get_clear_errors(body, hl, spec_error):
    if hl == 95:
        hl = len(body) - 8
    with pytest.raises(ProtocolError, match=spec_error):
        parse_infer_request(body, hl)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"x": np.zeros((2, 3), np.float32)}, "does not match"),
        ({"x": np.zeros((2, 4), np.int32)}, "datatype INT32"),
        ({"z": np.zeros((2, 4), np.float32)}, "unknown input"),
        ({"x": np.zeros((9, 4), np.float32)}, "max_batch_size"),
    ],
)
def test_wrong_shapes_and_types_against_the_model(inputs, message):
    body, hl = build_infer_request(inputs)
    with pytest.raises(ProtocolError, match=message):
        bind_inputs(parse_infer_request(body, hl), SPEC, None, 8)


def test_extra_binary_bytes_are_refused():
    body, hl = build_infer_request({"x": np.zeros((1, 4), np.float32)})
    with pytest.raises(ProtocolError, match="not claimed"):
        parse_infer_request(body + b"junk", hl)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512), st.one_of(st.none(), st.integers(-5, 600)))
def test_fuzz_request_parser(body, hl):
    try:
        req = parse_infer_request(body, hl)
        bind_inputs(req, SPEC, None, 8)
    except (ProtocolError, TensorError):
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "inputs": st.lists(
                st.dictionaries(
                    st.sampled_from(["name", "datatype", "shape", "data", "parameters"]), json_values
                ),
                max_size=3,
            )
        }
    )
)
def test_fuzz_structured_json(doc):
    try:
        req = parse_infer_request(json.dumps(doc).encode(), None)
        bind_inputs(req, SPEC, None, 8)
    except (ProtocolError, TensorError):
        pass


def test_compressed_bodies_are_bounded():
    from shoal.protocol.compression import CompressionError, compress, decompress

    body = b"a" * 100_000
    for enc in ("zstd", "gzip"):
        assert decompress(compress(body, enc), enc, 200_000) == body
        with pytest.raises(CompressionError) as e:
            decompress(compress(body, enc), enc, 50_000)  # a "bomb": small on the wire, large decoded
        assert e.value.status == 413
        with pytest.raises(CompressionError):
            decompress(b"garbage" * 10, enc, 1000)
    with pytest.raises(CompressionError) as e:
        decompress(body, "br", 10)
    assert e.value.status == 415


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["zstd", "gzip"]))
def test_fuzz_decompress(data, enc):
    from shoal.protocol.compression import CompressionError, decompress

    try:
        decompress(data, enc, 10_000)
    except CompressionError:
        pass


def test_binary_response_straight_from_a_result_frame():
    from shoal.protocol.oip import binary_response
    from shoal.protocol.tensors import pack_tensors

    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    specs, bufs = pack_tensors({"y": y, "s": np.array([b"ab", b"c"], dtype=object)})
    payload = b"".join(bytes(b) for b in bufs)
    body, hl = binary_response("m", "1", "r1", specs, payload)
    doc, arrays = parse_infer_response(body, hl)
    assert doc["id"] == "r1" and doc["model_name"] == "m"
    np.testing.assert_array_equal(arrays["y"], y)
    bad = [msgspec.structs.replace(specs[0], size=4), specs[1]]
    with pytest.raises(TensorError):
        binary_response("m", "1", None, bad, payload)
    with pytest.raises(TensorError):
        binary_response("m", "1", None, specs, payload + b"x")
