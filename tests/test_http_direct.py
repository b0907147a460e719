"""The gateway answers inference requests without ASGI (``shoal/httpdirect.py``) on the same
connections as its other requests: what HTTP/1.1 clients rely on must hold for both alike, checked
here on raw sockets against a real gateway and worker, with h11 reading the answers."""

import json
import socket

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture
def gateway(cluster, model_repo):
    lc = cluster(gateway_args=["--max-body-mb", "0.01"])  # 10 485 bytes
    lc.add_worker("echo", repo=model_repo)
    lc.wait_workers("echo", 1)
    return lc


def _infer_body(values: list[float]) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, len(values)], "data": values}]}
    ).encode()


def _post(lc, body: bytes, path: str = "/v2/models/echo/infer", extra: bytes = b"", auth: bool = True) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if auth:
        head += f"Authorization: Bearer {lc.api_key}\r\n"
    return head.encode() + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def _get(lc, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {lc.api_key}\r\n\r\n".encode()


class _Reader:
    """Responses read off a socket, in order, with h11."""

    def __init__(self, s: socket.socket) -> None:
        self.s = s
        self.conn = h11.Connection(h11.CLIENT)
        self.closed = False

    def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        status, headers, body = None, {}, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.s.recv(65536))
                continue
            if isinstance(event, h11.InformationalResponse):
                status = event.status_code  # 100 Continue: the caller sends its body
                return status, dict(event.headers), b""
            if isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                    self.closed = True
                else:
                    self.conn.start_next_cycle()
                return status, headers, body
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed before an answer")


def _connect(lc) -> socket.socket:
    return socket.create_connection(("127.0.0.1", lc.http_port), timeout=30)


def _requests(conn: h11.Connection, n: int) -> None:
    """Make h11's client side expect ``n`` answers (the requests themselves were written raw)."""
    for _ in range(n):
        conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
        conn.send(h11.EndOfMessage())


def test_pipelined_requests_of_both_kinds_are_answered_in_order(gateway):
    lc = gateway
    wire = (
        _post(lc, _infer_body([1, 2]))
        + _get(lc, "/v2/health/ready")
        + _post(lc, _infer_body([3]), "/v2/models/a%2Fb/infer")  # not a model name
        + _post(lc, _infer_body([4, 5, 6]))
        + _post(lc, _infer_body([7]), "/v2/models/infer")  # the metadata of a model named "infer"
        + _post(lc, _infer_body([8]), "/v2/models/echo/ready/infer")
        + _post(lc, _infer_body([10]), "http://x/v2/models/echo/infer?q=1")  # the absolute form
    )
    with _connect(lc) as s:
        s.sendall(wire)  # all at once: the gateway answers one at a time, in order
        r = _Reader(s)
        got = []
        for _ in range(7):
            _requests(r.conn, 1)
            got.append(r.response())
    assert got[0][0] == 200 and json.loads(got[0][2])["outputs"][0]["data"] == [1, 2]
    assert got[1][0] == 200 and json.loads(got[1][2]) == {"ready": True}
    assert got[2][0] == 400 and "a/b" in json.loads(got[2][2])["error"]
    assert got[3][0] == 200 and json.loads(got[3][2])["outputs"][0]["data"] == [4, 5, 6]
    assert got[4][0] == 405 and "takes GET" in json.loads(got[4][2])["error"]
    assert got[5][0] == 404 and "no such endpoint" in json.loads(got[5][2])["error"]
    assert got[6][0] == 200 and json.loads(got[6][2])["outputs"][0]["data"] == [10]
    assert not r.closed


def test_a_request_refused_before_its_body_leaves_the_connection_usable(gateway):
    lc = gateway
    with _connect(lc) as s:
        r = _Reader(s)
        s.sendall(_post(lc, _infer_body([1.0] * 500), auth=False))  # no credentials: 401 from its head
        _requests(r.conn, 1)
        status, headers, body = r.response()
        assert status == 401 and headers[b"www-authenticate"].startswith(b"Bearer")
        s.sendall(_post(lc, _infer_body([9])))  # the body above was read and dropped
        _requests(r.conn, 1)
        status, _, body = r.response()
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == [9]


def test_expect_100_continue_is_answered_before_the_body(gateway):
    lc = gateway
    body = _infer_body([1, 2, 3])
    with _connect(lc) as s:
        r = _Reader(s)
        head = _post(lc, body, extra=b"Expect: 100-continue\r\n")[: -len(body)]
        s.sendall(head)
        r.conn.send(
            h11.Request(
                method="POST",
                target="/",
                headers=[("Host", "x"), ("Content-Length", str(len(body))), ("Expect", "100-continue")],
            )
        )
        status, _, _ = r.response()
        assert status == 100  # the gateway asks for the body only once its head passed
        s.sendall(body)
        r.conn.send(h11.Data(data=body))
        r.conn.send(h11.EndOfMessage())
        status, _, answer = r.response()
        assert status == 200 and json.loads(answer)["outputs"][0]["data"] == [1, 2, 3]


def test_a_body_over_the_limit_is_413_whether_declared_or_streamed(gateway):
    lc = gateway
    big = _infer_body([1.0] * 5000)  # over the 10 485 bytes allowed
    with _connect(lc) as s:  # declared: refused from its head, the body never read
        s.sendall(_post(lc, big)[: -len(big)])
        r = _Reader(s)
        _requests(r.conn, 1)
        status, headers, body = r.response()
        assert status == 413 and "exceeds" in json.loads(body)["error"]
        assert headers[b"connection"] == b"close"  # its body is not waited for
    with _connect(lc) as s:  # chunked, no length: refused once too much has come, then closed
        head = (
            f"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {lc.api_key}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        s.sendall(head + b"%x\r\n" % len(big) + big + b"\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        assert out.startswith(b"HTTP/1.1 413 ") and b"connection: close" in out.lower()
    with lc.client() as c:  # and others are served
        assert c.get_json("/v2/health/ready")[0] == 200


def test_http_1_0_and_connection_close_get_one_answer_and_a_close(gateway):
    lc = gateway
    for version, extra in (("1.0", b""), ("1.1", b"Connection: close\r\n")):
        wire = _post(lc, _infer_body([2]), extra=extra).replace(b"HTTP/1.1", f"HTTP/{version}".encode(), 1)
        with _connect(lc) as s:
            s.sendall(wire)
            out = b""
            while chunk := s.recv(65536):  # ends: the gateway closes after its answer
                out += chunk
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["outputs"][0]["data"] == [2]


# ------------------------------------------------------------------------------------------ fuzz

KINDS = ("infer", "infer-bad-json", "infer-bad-name", "infer-no-auth", "ready", "infer-huge")
EXPECTED = {"infer": 200, "infer-bad-json": 400, "infer-bad-name": 400, "infer-no-auth": 401, "ready": 200,
            "infer-huge": 413}


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory, model_repo):
    from shoal.local import LocalCluster

    lc = LocalCluster(tmp_path_factory.mktemp("fuzz"), gateway_args=["--max-body-mb", "0.01"]).start()
    lc.add_worker("echo", repo=model_repo)
    lc.wait_workers("echo", 1)
    yield lc
    lc.stop()


def _wire(lc, kind: str, i: int) -> bytes:
    if kind == "infer":
        return _post(lc, _infer_body([float(i), -1.5]))
    if kind == "infer-bad-json":
        return _post(lc, b'{"inputs": [')
    if kind == "infer-bad-name":
        return _post(lc, _infer_body([1]), "/v2/models/..%2Fx/infer")
    if kind == "infer-no-auth":
        return _post(lc, _infer_body([1]), auth=False)
    if kind == "infer-huge":
        return _post(lc, _infer_body([1.0] * 5000))  # declared past the limit: 413, connection closed
    return _get(lc, "/v2/health/ready")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=8),
    hang_up=st.booleans(),
)
def test_any_stream_of_requests_cut_anywhere_is_answered_in_order_or_dropped_cleanly(
    shared_gateway, kinds, cuts, hang_up
):
    """Requests of every kind, pipelined, their bytes written in pieces cut anywhere: each gets its
    own answer, in order, up to the first that closes the connection (413); a client that hangs up
    half way leaves the gateway serving others."""
    lc = shared_gateway
    wire = b"".join(_wire(lc, k, i) for i, k in enumerate(kinds))
    pieces, at = [], 0
    for c in cuts:
        if at >= len(wire):
            break
        pieces.append(wire[at : at + c])
        at += c
    pieces.append(wire[at:])
    with _connect(lc) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hang_up:  # half the stream, then gone: nothing to check on this connection
            s.sendall(wire[: len(wire) // 2])
        else:
            for p in pieces:
                if p:
                    s.sendall(p)
            r = _Reader(s)
            for i, kind in enumerate(kinds):
                _requests(r.conn, 1)
                status, _, body = r.response()
                assert status == EXPECTED[kind], (kind, status, body)
                if kind == "infer":
                    assert json.loads(body)["outputs"][0]["data"] == [float(i), -1.5]
                if kind == "infer-huge":
                    assert r.closed
                    break
    with lc.client() as c:  # the gateway serves on
        assert c.get_json("/v2/health/ready")[0] == 200
