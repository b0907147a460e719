"""Credentials carry only what they need (the role matrix of docs/security.md, enforced by a real
gateway), login guessing is throttled at central without starving legitimate devices (from one address,
from 250 rotating ones, from the devices' own shared address), and a hung database makes central answer
503 instead of hanging while devices checked recently keep routing."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time

import pytest

from shoal.bench.security import measure_login_guessing
from shoal.central.auth import GUESS_BUDGET_BURST, GUESS_BUDGET_PER_S
from shoal.client.http import OipHttpClient
from shoal.local import LocalCentral
from shoal.security.tokens import sign_token

X = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}).encode()
CK = json.dumps({"inputs": [{"name": "data", "datatype": "UINT8", "shape": [1, 2], "data": [1, 2]}]}).encode()
JSON = {"Content-Type": "application/json"}


def _token(sub: str, model: str, version: str | None = None) -> str:
    claims = {"aud": "cluster", "sub": sub, "model": model}
    if version:
        claims["version"] = version
    return sign_token(claims, b"tk", ttl_s=120)


def _call(lc, token: str | None, method: str, path: str, body: bytes | None = None, scheme: str = "Bearer"):
    with OipHttpClient(lc.url) as c:
        headers = dict(JSON)
        if token:
            headers["Authorization"] = f"{scheme} {token}"
        code, rh, data = c.request(method, path, body, headers)
    return code, json.loads(data) if data and rh.get("content-type", "").startswith("application/json") else data


@pytest.fixture
def scoped(cluster, model_repo, tmp_path):
    lc = cluster(
        gateway_args=[
            "--token-key",
            "tk",
            "--api-key",
            "scrape:scrape-key-1",
            "--api-key",
            "device:echo:device-key-1",
            "--store-results",
            f"sqlite:///{tmp_path / 'results.db'}",
            "--results-dir",
            str(tmp_path / "results"),
        ]
    )
    lc.add_worker("echo", repo=model_repo)
    lc.add_worker("checksum")
    lc.wait_workers("echo", 1)
    lc.wait_workers("checksum", 1)
    return lc


def test_each_role_reaches_only_its_endpoints(scoped):
    lc = scoped
    op = lc.api_key
    dev = _token("cam-a", "echo")
    pinned = _token("cam-a", "echo", version="1")
    matrix = [
        # (credential, method, path, body, expected status)
        (None, "GET", "/v2/health/live", None, 200),
        (None, "GET", "/v2/health/ready", None, 401),
        (None, "POST", "/v2/models/echo/infer", X, 401),
        (dev, "GET", "/v2/health/ready", None, 200),
        (dev, "GET", "/v2", None, 200),
        (dev, "GET", "/v2/models/echo", None, 200),
        (dev, "GET", "/v2/models/echo/ready", None, 200),
        (dev, "POST", "/v2/models/echo/infer", X, 200),
        (dev, "POST", "/v2/models/checksum/infer", CK, 403),
        (dev, "GET", "/v2/models/checksum", None, 403),
        (dev, "GET", "/v2/status", None, 403),
        (dev, "GET", "/metrics", None, 403),
        (dev, "GET", "/v2/results", None, 403),
        (dev, "GET", "/v2/models/echo/stats", None, 200),
        (dev, "GET", "/v2/models/echo/versions/1/config", None, 200),
        (dev, "GET", "/v2/models/checksum/stats", None, 403),
        (dev, "GET", "/v2/models/checksum/config", None, 403),
        (dev, "GET", "/v2/models/stats", None, 403),
        (dev, "GET", "/v2/openapi.json", None, 200),
        ("scrape-key-1", "GET", "/v2/models/stats", None, 200),
        ("scrape-key-1", "GET", "/v2/models/echo/stats", None, 403),
        ("scrape-key-1", "GET", "/v2/openapi.json", None, 403),
        (op, "GET", "/v2/models/stats", None, 200),
        (None, "GET", "/v2/openapi.json", None, 401),
        (pinned, "POST", "/v2/models/echo/versions/1/infer", X, 200),
        (pinned, "POST", "/v2/models/echo/versions/7/infer", X, 403),
        ("device-key-1", "POST", "/v2/models/echo/infer", X, 200),
        ("device-key-1", "POST", "/v2/models/checksum/infer", CK, 403),
        ("device-key-1", "GET", "/v2/status", None, 403),
        ("scrape-key-1", "GET", "/metrics", None, 200),
        ("scrape-key-1", "GET", "/v2/health/ready", None, 403),
        ("scrape-key-1", "POST", "/v2/models/echo/infer", X, 403),
        ("scrape-key-1", "GET", "/v2/status", None, 403),
        ("scrape-key-1", "GET", "/v2/results", None, 403),
        (op, "GET", "/v2/status", None, 200),
        (op, "GET", "/metrics", None, 200),
        (op, "GET", "/v2/results", None, 200),
        (op, "POST", "/v2/models/checksum/infer", CK, 200),
        ("wrong-key", "GET", "/v2/health/ready", None, 401),
    ]
    got = [(who, m, p, _call(lc, who, m, p, b)[0], want) for who, m, p, b, want in matrix]
    assert [g for g in got if g[3] != g[4]] == []
    code, body = _call(lc, dev, "GET", "/v2/status")
    assert code == 403 and "operator" in body["error"] and "device" in body["error"]
    code, body = _call(lc, dev, "POST", "/v2/models/checksum/infer", CK)
    assert "echo" in body["error"] and "checksum" in body["error"]
    assert _call(lc, dev, "GET", "/v2/health/ready", scheme="bearer")[0] == 200  # any case


def test_a_device_reads_its_own_stored_result_and_nothing_else(scoped):
    lc = scoped
    mine, other = _token("cam-a", "echo"), _token("cam-b", "echo")
    code, answer = _call(lc, mine, "POST", "/v2/models/echo/infer", X)
    assert code == 200
    rid = answer["id"]
    end = time.monotonic() + 20
    while _call(lc, lc.api_key, "GET", f"/v2/results/{rid}")[0] != 200:  # written in the background
        assert time.monotonic() < end, "the result was never stored"
        time.sleep(0.05)
    code, stored = _call(lc, mine, "GET", f"/v2/results/{rid}")
    assert code == 200 and stored["client"] == "device:cam-a" and stored["outputs"][0]["data"] == [1, 2]
    assert _call(lc, mine, "GET", f"/v2/results/{rid}/inputs/x")[0] == 200
    assert _call(lc, other, "GET", f"/v2/results/{rid}")[0] == 404  # as if it did not exist
    assert _call(lc, other, "GET", f"/v2/results/{rid}/inputs/x")[0] == 404
    assert _call(lc, mine, "GET", "/v2/results?model=echo")[0] == 403


# ------------------------------------------------------------------------------ login guessing


def test_password_guessing_is_throttled_and_others_keep_their_speed(tmp_path):
    r = measure_login_guessing(tmp_path, seconds=8.0, devices=8)
    # The guesser got a handful of hash checks; everything else was refused at once, without one.
    assert r["guesses_hash_checked"] <= 7, r
    assert r["guesses_refused_429"] >= 10 * (r["guesses"] - r["guesses_refused_429"]), r
    assert r["throttled_counted"] == r["guesses_refused_429"], r
    # Legitimate first routes (a slow hash each) kept their speed while it ran.
    assert r["first_route_ratio"] < 3.0, r


def test_a_guesser_rotating_addresses_and_fresh_names_gets_no_hash_and_slows_no_one(tmp_path):
    r = measure_login_guessing(tmp_path, "rotating", seconds=8.0, devices=6)
    # Names that do not exist run no hash; the budget bounds failed checks anyway (a burst of 10).
    assert r["guesses_hash_checked"] <= GUESS_BUDGET_BURST, r
    assert r["guesses"] >= 1000, r  # at full speed (the old rules hashed each: 47 a second)
    assert r["first_logins_refused"] == 0 and r["first_route_ratio"] < 3.0, r


def test_guessing_from_a_shared_address_locks_out_no_first_login_nor_a_known_client(tmp_path):
    # One client at 127.0.0.1 guesses 17 devices' passwords, one of them a device that logged in before;
    # new devices and the operator log in from the same address meanwhile.
    r = measure_login_guessing(tmp_path, "shared-address", seconds=8.0, devices=6, known=1, auth_cache_s=2.0)
    assert r["first_logins_refused"] == 0 and r["operator_refused"] is None, r
    assert r["known_clients_let_in"] == "1/1", r
    # Hash checks: a first guess per account, then the budget's burst and rate.
    assert r["guesses_hash_checked"] <= 17 + GUESS_BUDGET_BURST + GUESS_BUDGET_PER_S * r["seconds"], r
    assert r["first_route_ratio"] < 3.0, r


# ---------------------------------------------------------------------------- a hung database


class FreezableProxy:
    """A TCP relay to PostgreSQL that can stop relaying (connections stay open, nothing moves): what a
    hung database server or a dead network path looks like to central."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.moving = threading.Event()
        self.moving.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                self.moving.wait()
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.moving.set()
        self.listener.close()


FRESH_S = 2.0  # how long a check stays fresh in central's cache here (--auth-cache; 10 s by default)


def test_a_hung_database_makes_new_logins_503_and_keeps_recent_ones_routing(tmp_path, pg_url):
    from urllib.parse import urlsplit

    u = urlsplit(pg_url)
    proxy = FreezableProxy((u.hostname or "127.0.0.1", u.port or 5432))
    db = pg_url.replace(f"{u.hostname}:{u.port or 5432}", f"127.0.0.1:{proxy.port}")

    def route(conn: http.client.HTTPConnection, device: str, password: str = "device-password") -> tuple[int, dict]:
        auth = "Basic " + base64.b64encode(f"{device}:{password}".encode()).decode()
        conn.request("POST", "/v1/route", b'{"model": "echo"}', {"Authorization": auth, **JSON})
        r = conn.getresponse()
        return r.status, json.loads(r.read())

    try:
        args = ["--db-timeout", "1", "--startup-grace", "0", "--auth-cache", str(FRESH_S)]
        with LocalCentral(tmp_path, db=db, extra_args=args).start() as c:
            c.add_account("device", "cam-new", "device-password")
            c.add_account("device", "cam-steady", "device-password")
            # A hung request fails these connections' reads after 30 s (--db-timeout answers in 1).
            conn = http.client.HTTPConnection("127.0.0.1", c.http_port, timeout=30)
            steady = http.client.HTTPConnection("127.0.0.1", c.http_port, timeout=30)
            assert route(steady, "cam-steady")[0] == 404  # checked: let in (no cluster serves echo)
            fresh_until = time.monotonic() + FRESH_S  # its check is fresh until then at most
            proxy.moving.clear()
            # Credentials never checked here: 503, answered, not hung.
            status, body = route(conn, "cam-new")
            assert status == 503 and "database" in body["error"], (status, body)
            # The device checked just before keeps routing, until past its check's fresh time.
            answers = []
            while True:
                started = time.monotonic()
                answers.append(route(steady, "cam-steady")[0])
                if started > fresh_until + 0.5:
                    break
                time.sleep(0.1)
            assert set(answers) == {404}, answers
            assert route(steady, "cam-steady", "a-wrong-password")[0] == 503  # no check: no way in
            proxy.moving.set()
            end = time.monotonic() + 30
            while True:  # the database back: routes work again
                status, _ = route(conn, "cam-new")
                if status == 404:
                    break
                assert time.monotonic() < end, status
                time.sleep(0.05)
            conn.close()
            steady.close()
    finally:
        proxy.close()
