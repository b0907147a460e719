"""``shoal central`` as a real process on loopback: reports, routes and their tokens, bad credentials,
malformed input on every route, load spreading, expiry of silent clusters, accounts, commands relayed
to devices, the webhook, the command line and the status page in headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import http.server
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_for

from shoal.central.commands import RECHECK_S
from shoal.central.server import endpoint_list
from shoal.security.tokens import TokenError, sign_token, verify_token

OPERATOR = ("admin", "operator-pass")
PW = "s3cret-pass"


class CentralProc:
    """One ``python -m shoal central`` child; stopped by its own pid."""

    def __init__(self, workdir: Path, db: str | None = None, extra: list[str] | None = None, name="central"):
        self.workdir = workdir
        self.db = db or f"sqlite:///{workdir / 'central.db'}"
        self.extra = extra or []
        self.name = name
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> CentralProc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = self.workdir / f"{self.name}.ports.json"
        ports.unlink(missing_ok=True)
        self.log = self.workdir / f"{self.name}.log"
        env = {**os.environ, "SHOAL_OPERATOR_PASSWORD": OPERATOR[1], "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "shoal", "central", "--http", "127.0.0.1:0", "--db", self.db]
        cmd += ["--ports-file", str(ports), "--bootstrap-operator", OPERATOR[0], *self.extra]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        end = time.monotonic() + timeout
        while not ports.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"central did not start:\n{self.log.read_text()}")
            time.sleep(0.02)
        info = json.loads(ports.read_text())
        assert info["pid"] == self.proc.pid
        self.port = info["http"]
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        auth: tuple[str, str] | str | None = OPERATOR,
        raw: bytes | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if isinstance(auth, tuple):
            headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        elif isinstance(auth, str):
            headers["Authorization"] = f"Bearer {auth}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            payload = r.read()
        finally:
            conn.close()
        ctype = r.getheader("content-type", "")
        return r.status, json.loads(payload) if ctype.startswith("application/json") else payload

    def account(self, kind: str, name: str, password: str = PW) -> tuple[str, str]:
        code, body = self.call("POST", "/v1/accounts", {"kind": kind, "name": name, "password": password})
        assert code == 201, body
        return name, password

    def report(self, cluster: tuple[str, str], models: list[dict], address: str | None = None) -> dict:
        port = 8000 + sum(cluster[0].encode()) % 1000
        body = {"address": address or f"http://127.0.0.1:{port}", "models": models}
        code, answer = self.call("POST", "/v1/clusters/report", body, auth=cluster)
        assert code == 200, answer
        return answer


def model(name="mnist-cnn", version="1", in_flight=0, capacity=128, queue=0, latency_ms=1.0, ready=True):
    return {
        "name": name,
        "version": version,
        "ready": ready,
        "in_flight": in_flight,
        "capacity": capacity,
        "queue": queue,
        "latency_ms": latency_ms,
        "workers": 2,
    }


def table(central: CentralProc) -> list[tuple[str, str, list]]:
    """The live table without its clock fields, to compare before and after."""
    return [
        (c["name"], c["address"], c["models"]) for c in central.call("GET", "/v1/clusters")[1]["clusters"]
    ]


def key_of(answer: dict) -> bytes:
    return base64.urlsafe_b64decode(answer["token_key"])


def devices_seen(central: CentralProc) -> set[str]:
    """Devices central has seen: a long poll's device is listed once its request is in central's hands."""
    return {d["name"] for d in central.call("GET", "/v1/status")[1]["devices"]}


@pytest.fixture(scope="module")
def central(tmp_path_factory):
    c = CentralProc(tmp_path_factory.mktemp("central"), extra=["--startup-grace", "0"]).start()
    yield c
    c.stop()


def test_a_cluster_reports_and_a_device_gets_a_token_only_that_cluster_accepts(central):
    a = central.account("cluster", "t1-a")
    b = central.account("cluster", "t1-b")
    dev = central.account("device", "t1-cam")
    ans_a = central.report(a, [model("t1-model", in_flight=100)])
    ans_b = central.report(b, [model("t1-model", in_flight=1)])
    assert ans_a["ok"] is True and ans_a["cluster"] == "t1-a" and ans_a["report_interval_s"] == 1.0
    assert len(key_of(ans_a)) == 32 and key_of(ans_a) != key_of(ans_b)
    assert central.report(a, [model("t1-model", in_flight=100)])["token_key"] == ans_a["token_key"]

    t0 = time.time()
    code, r = central.call("POST", "/v1/route", {"model": "t1-model"}, auth=dev)
    assert code == 200, r
    assert r["cluster"] == "t1-b" and r["model"] == "t1-model" and r["version"] == "1"
    assert r["url"].startswith("http://127.0.0.1:")
    assert "traceparent" not in r  # central does not trace (no --trace-endpoint): the answer is as before
    assert t0 + 290 <= r["expires_at"] <= time.time() + 301
    claims = verify_token(r["token"], key_of(ans_b), audience="t1-b")
    assert claims["aud"] == "t1-b" and claims["sub"] == "t1-cam" and claims["model"] == "t1-model"
    # A token for another cluster: cluster a refuses it, with its own key or with b's.
    with pytest.raises(TokenError, match="signature"):
        verify_token(r["token"], key_of(ans_a), audience="t1-a")
    with pytest.raises(TokenError, match="another cluster"):
        verify_token(r["token"], key_of(ans_b), audience="t1-a")

    # A session token from /v1/login works in place of Basic.
    code, s = central.call("POST", "/v1/login", auth=dev)
    assert code == 200 and s["kind"] == "device" and s["expires_in"] == 3600
    code, r2 = central.call("POST", "/v1/route", {"model": "t1-model", "exclude": ["t1-b"]}, auth=s["token"])
    assert code == 200 and r2["cluster"] == "t1-a"

    code, live = central.call("GET", "/v1/clusters")
    names = {c["name"]: c for c in live["clusters"]}
    assert {"t1-a", "t1-b"} <= set(names)
    assert names["t1-b"]["models"][0]["in_flight"] == 1 and names["t1-b"]["live"] is True


def test_wrong_credentials_get_a_clear_401_and_change_nothing(central):
    dev = central.account("device", "t2-cam")
    cl = central.account("cluster", "t2-site")
    before_accounts = central.call("GET", "/v1/accounts")[1]
    before_clusters = table(central)
    cases = [
        ("POST", "/v1/route", {"model": "m"}, (dev[0], "wrong-password")),
        ("POST", "/v1/route", {"model": "m"}, ("nobody", PW)),
        ("POST", "/v1/route", {"model": "m"}, cl),  # a cluster's credentials are not a device's
        ("POST", "/v1/login", None, (dev[0], "wrong-password")),
        ("POST", "/v1/clusters/report", {"address": "http://x:1", "models": []}, (cl[0], "wrong-password")),
        ("POST", "/v1/clusters/report", {"address": "http://x:1", "models": []}, dev),
        ("POST", "/v1/accounts", {"kind": "device", "name": "t2-x", "password": PW}, (OPERATOR[0], "nope")),
        ("POST", "/v1/accounts", {"kind": "device", "name": "t2-x", "password": PW}, dev),
        ("GET", "/v1/status", None, None),
        ("GET", "/v1/accounts", None, "not-a-token"),
    ]
    for method, path, body, auth in cases:
        code, answer = central.call(method, path, body, auth=auth)
        assert code == 401, (path, auth, answer)
        assert "error" in answer and ("password" in answer["error"] or "credentials" in answer["error"])
        assert "wrong-password" not in answer["error"]
    code, answer = central.call("POST", "/v1/route", {"model": "m"}, auth="garbage.token")
    assert code == 401 and "invalid session token" in answer["error"]
    assert central.call("GET", "/v1/accounts")[1] == before_accounts
    assert table(central) == before_clusters
    assert "wrong-password" not in central.log.read_text()


def test_expired_and_forged_session_tokens_are_refused(central):
    dev = central.account("device", "t3-cam")
    db = central.db.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        (master,) = conn.execute("SELECT value FROM shoal_secrets WHERE name = 'master'").fetchone()
    session_key = hmac.new(master, b"device-session", hashlib.sha256).digest()
    claims = {"aud": "shoal-central", "sub": dev[0], "kind": "device"}
    good = sign_token(claims, session_key, 60)
    assert central.call("POST", "/v1/route", {"model": "none"}, auth=good)[0] == 404  # accepted
    expired = sign_token(claims, session_key, 60, now=time.time() - 3600)
    code, answer = central.call("POST", "/v1/route", {"model": "none"}, auth=expired)
    assert code == 401 and "expired" in answer["error"]
    forged = sign_token(claims, os.urandom(32), 60)
    code, answer = central.call("POST", "/v1/route", {"model": "none"}, auth=forged)
    assert code == 401 and "signature" in answer["error"]
    ghost = sign_token({**claims, "sub": "t3-never-existed"}, session_key, 60)
    code, answer = central.call("POST", "/v1/route", {"model": "none"}, auth=ghost)
    assert code == 401 and "no device account" in answer["error"]


def test_a_model_nobody_serves_is_a_404_naming_it(central):
    dev = central.account("device", "t4-cam")
    cl = central.account("cluster", "t4-site")
    central.report(cl, [model("t4-model", version="1"), model("t4-cold", ready=False)])
    code, answer = central.call("POST", "/v1/route", {"model": "t4-nothing"}, auth=dev)
    assert (code, answer) == (404, {"error": "no live cluster serves model 't4-nothing'"})
    code, answer = central.call("POST", "/v1/route", {"model": "t4-model", "version": "7"}, auth=dev)
    assert (code, answer) == (404, {"error": "no live cluster serves model 't4-model' version '7'"})
    code, answer = central.call("POST", "/v1/route", {"model": "t4-cold"}, auth=dev)
    assert code == 404 and "t4-cold" in answer["error"]
    code, answer = central.call("POST", "/v1/route", {"model": "t4-model", "exclude": ["t4-site"]}, auth=dev)
    assert code == 404 and "excluding t4-site" in answer["error"]


def test_an_invalid_version_name_is_refused_and_breaks_nothing(central):
    # "²" passes str.isdigit() but not int(): once reported, it broke the cluster list for everyone.
    # Model names and versions now follow the one rule (ASCII letters, digits, "_", ".", "-").
    dev = central.account("device", "t4b-cam")
    cl = central.account("cluster", "t4b-site")
    body = {"address": "http://127.0.0.1:8123", "models": [model("t4b-model", version="²")]}
    code, answer = central.call("POST", "/v1/clusters/report", body, auth=cl)
    assert code == 400 and "$.models[0].version" in answer["error"], answer
    central.report(cl, [model("t4b-model", version="3"), model("t4b-model", version="beta")])
    code, answer = central.call("GET", "/v1/clusters")
    assert code == 200 and any(c["name"] == "t4b-site" for c in answer["clusters"])
    for bad in ("²", "../3", "3\n", ""):
        code, answer = central.call("POST", "/v1/route", {"model": "t4b-model", "version": bad}, auth=dev)
        assert code == 400 and "version" in answer["error"], (bad, answer)
    code, answer = central.call("POST", "/v1/route", {"model": "t4b-model", "version": "beta"}, auth=dev)
    assert code == 200 and answer["version"] == "beta"
    code, answer = central.call("POST", "/v1/route", {"model": "t4b-model"}, auth=dev)
    assert code == 200 and answer["version"] == "3"  # a number is newer than a name


def test_malformed_json_to_every_v1_route_is_a_400_and_changes_nothing(central):
    dev = central.account("device", "t5-cam")
    cl = central.account("cluster", "t5-site")
    central.report(cl, [model("t5-model")])
    code, cmd = central.call("POST", "/v1/devices/t5-cam/commands", {"command": "noop"})
    assert code == 201
    auth_for = {
        "/v1/route": dev,
        "/v1/login": dev,
        "/v1/commands": dev,
        "/v1/commands/{id}/ack": dev,
        "/v1/clusters/report": cl,
    }
    fill = {"{id}": str(cmd["id"]), "{kind}": "device", "{name}": "t5-cam"}

    def snapshot():
        st = central.call("GET", "/v1/status")[1]
        return central.call("GET", "/v1/accounts")[1], table(central), st["commands"], st["routes"]

    before = snapshot()
    seen = 0
    for method, pattern in endpoint_list():
        if not pattern.startswith("/v1/"):
            continue
        path = pattern
        for k, v in fill.items():
            path = path.replace(k, v)
        for bad in (b"{not json", b"[1, 2]", b'{"model": "t5-model"'):
            code, answer = central.call(method, path, raw=bad, auth=auth_for.get(pattern, OPERATOR))
            assert code == 400, (method, path, bad, answer)
            assert answer["error"].startswith("malformed JSON body"), answer
            seen += 1
    assert seen >= 3 * 12
    assert snapshot() == before
    # Well-formed JSON with wrong fields: each names the field.
    for body, word in [
        ({"model": 5.5}, "model"),
        ({}, "model"),
        ({"model": "x", "exclude": "a"}, "exclude"),
    ]:
        code, answer = central.call("POST", "/v1/route", body, auth=dev)
        assert code == 400 and word in answer["error"], answer
    for body, word in [
        ({"models": []}, "address"),
        ({"address": "ftp://x", "models": []}, "address"),
        ({"address": "http://x:1", "models": [{"name": "m", "version": "1", "capacity": -1}]}, "capacity"),
        ({"address": "http://x:1", "models": {}}, "models"),
    ]:
        code, answer = central.call("POST", "/v1/clusters/report", body, auth=cl)
        assert code == 400 and word in answer["error"], answer
    assert snapshot() == before


def test_with_one_cluster_loaded_new_devices_go_to_the_other(central):
    busy = central.account("cluster", "t6-busy")
    idle = central.account("cluster", "t6-idle")
    central.report(busy, [model("t6-model", in_flight=120, capacity=128)])
    central.report(idle, [model("t6-model", in_flight=2, capacity=128)])
    served = {}
    for i in range(8):
        dev = central.account("device", f"t6-cam{i}")
        code, r = central.call("POST", "/v1/route", {"model": "t6-model"}, auth=dev)
        assert code == 200
        served[r["cluster"]] = served.get(r["cluster"], 0) + 1
    assert served == {"t6-idle": 8}
    # Two equally idle clusters: a burst of devices between two reports is spread over both.
    central.report(busy, [model("t6-model", capacity=4)])
    central.report(idle, [model("t6-model", capacity=4)])
    served = {}
    for i in range(8):
        code, r = central.call("POST", "/v1/route", {"model": "t6-model"}, auth=(f"t6-cam{i}", PW))
        served[r["cluster"]] = served.get(r["cluster"], 0) + 1
    assert served == {"t6-busy": 4, "t6-idle": 4}


def test_a_cluster_missing_three_reports_is_out_until_it_comes_back(tmp_path):
    # A central of its own with a short report interval: out after 3 x 0.5 s, not the default 3 s.
    interval = 0.5
    c = CentralProc(tmp_path, extra=["--startup-grace", "0", "--report-interval", str(interval)]).start()
    try:
        cl = c.account("cluster", "t7-site")
        dev = c.account("device", "t7-cam")
        assert c.call("POST", "/v1/route", {"model": "t7-model"}, auth=dev)[0] == 404  # its check cached
        reported = time.monotonic()
        assert c.report(cl, [model("t7-model")])["report_interval_s"] == interval
        assert c.call("POST", "/v1/route", {"model": "t7-model"}, auth=dev)[0] == 200
        code, answer = wait_for(
            lambda: (r := c.call("POST", "/v1/route", {"model": "t7-model"}, auth=dev))[0] != 200 and r,
            "the silent cluster was never taken out",
        )
        assert time.monotonic() - reported >= 3 * interval  # not before three reports were missed
        assert code == 404 and "t7-model" in answer["error"]
        assert "t7-site" not in {x["name"] for x in c.call("GET", "/v1/clusters")[1]["clusters"]}
        st = {x["name"]: x for x in c.call("GET", "/v1/status")[1]["clusters"]}
        assert st["t7-site"]["live"] is False
        c.report(cl, [model("t7-model")])
        code, r = c.call("POST", "/v1/route", {"model": "t7-model"}, auth=dev)
        assert code == 200 and r["cluster"] == "t7-site"
    finally:
        c.stop()


def test_accounts_api(central):
    code, answer = central.call("POST", "/v1/accounts", {"kind": "robot", "name": "t8", "password": PW})
    assert code == 400 and "kind" in answer["error"]
    code, answer = central.call("POST", "/v1/accounts", {"kind": "device", "name": "t8 x", "password": PW})
    assert code == 400 and "name" in answer["error"]
    code, answer = central.call("POST", "/v1/accounts", {"kind": "device", "name": "t8", "password": "short"})
    assert code == 400 and "password" in answer["error"]
    dev = central.account("device", "t8-cam")
    code, answer = central.call("POST", "/v1/accounts", {"kind": "device", "name": "t8-cam", "password": PW})
    assert code == 409 and "already exists" in answer["error"]
    code, listing = central.call("GET", "/v1/accounts?kind=device")
    rows = [a for a in listing["accounts"] if a["name"] == "t8-cam"]
    assert rows and set(rows[0]) == {"kind", "name", "created_at"}
    assert all(a["kind"] == "device" for a in listing["accounts"])
    assert central.call("POST", "/v1/login", auth=dev)[0] == 200
    code, answer = central.call("DELETE", "/v1/accounts/device/t8-cam")
    assert code == 200 and answer["removed"] is True
    # Its cached credentials stop working at once on this replica.
    assert central.call("POST", "/v1/login", auth=dev)[0] == 401
    assert central.call("DELETE", "/v1/accounts/device/t8-cam")[0] == 404
    code, answer = central.call("DELETE", f"/v1/accounts/operator/{OPERATOR[0]}")
    assert code == 409 and "last operator" in answer["error"]


def test_an_operator_command_reaches_the_device_by_long_poll(central):
    dev = central.account("device", "t9-cam")
    code, answer = central.call("POST", "/v1/devices/t9-nobody/commands", {"command": "reboot"})
    assert code == 404 and "t9-nobody" in answer["error"]
    got: dict[str, Any] = {}

    def poll():
        t = time.monotonic()
        got["answer"] = central.call("GET", "/v1/commands?wait=20", auth=dev)
        got["waited"] = time.monotonic() - t

    th = threading.Thread(target=poll)
    th.start()
    # The poll is t9-cam's first request: central lists the device once the poll is waiting there.
    wait_for(lambda: "t9-cam" in devices_seen(central), "the long poll never reached central")
    assert th.is_alive()  # no command yet: the poll waits
    code, posted = central.call(
        "POST", "/v1/devices/t9-cam/commands", {"command": "set-rate", "args": {"fps": 5}}
    )
    assert code == 201 and isinstance(posted["id"], int)
    th.join(30)
    assert not th.is_alive(), "the command did not end the long poll"
    code, answer = got["answer"]
    # Product bound: woken by the command; unwoken, the poll would answer at its re-check, RECHECK_S
    # after it began waiting.
    assert code == 200 and got["waited"] < RECHECK_S
    (cmd,) = answer["commands"]
    assert cmd["id"] == posted["id"] and cmd["command"] == "set-rate" and cmd["args"] == {"fps": 5}
    assert cmd["created_by"] == OPERATOR[0]
    # Not acknowledged yet: delivered again. Acknowledged: gone.
    assert central.call("GET", "/v1/commands?wait=0", auth=dev)[1]["commands"][0]["id"] == posted["id"]
    code, answer = central.call("POST", f"/v1/commands/{posted['id']}/ack", {"result": {"fps": 5}}, auth=dev)
    assert (code, answer) == (200, {"ok": True, "id": posted["id"]})
    assert central.call("POST", f"/v1/commands/{posted['id']}/ack", auth=dev)[0] == 404
    assert central.call("GET", "/v1/commands?wait=0", auth=dev) == (200, {"commands": []})
    t = time.monotonic()
    assert central.call("GET", "/v1/commands?wait=0.3", auth=dev) == (200, {"commands": []})
    assert time.monotonic() - t >= 0.3  # nothing to deliver: the poll waits as long as it asked
    other = central.account("device", "t9-other")
    assert central.call("POST", f"/v1/commands/{posted['id']}/ack", auth=other)[0] == 404
    assert central.call("GET", "/v1/commands?wait=999", auth=dev)[0] == 400


def test_openapi_documents_every_route_and_metrics_are_served(central):
    code, doc = central.call("GET", "/v1/openapi.json", auth=None)
    assert code == 200 and doc["openapi"].startswith("3.")
    for method, pattern in endpoint_list():
        assert method.lower() in doc["paths"][pattern], (method, pattern)
    code, text = central.call("GET", "/metrics")
    assert code == 200 and b'shoal_central_routes_total{result="ok"}' in text
    assert b"shoal_central_clusters_live" in text and b"shoal_central_auth_failures_total" in text
    assert central.call("GET", "/metrics", auth=None)[0] == 401
    code, answer = central.call("GET", "/v1/nothing-here")
    assert code == 404 and "no such endpoint" in answer["error"]
    code, answer = central.call("GET", "/v1/route")
    assert code == 405 and "POST" in answer["error"]


def test_accounts_on_the_command_line(tmp_path):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "SHOAL_PASSWORD": "cli-secret-pass"}

    def shoal(*args, env=env, stdin=None):
        return subprocess.run(
            [sys.executable, "-m", "shoal", "central", *args, "--db", db],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            input=stdin,
        )

    r = shoal("accounts", "add", "device", "cam-cli")
    assert r.returncode == 0, r.stderr
    assert "cli-secret-pass" not in r.stdout + r.stderr
    noenv = {k: v for k, v in env.items() if k != "SHOAL_PASSWORD"}
    r = shoal("accounts", "add", "cluster", "site-cli", env=noenv, stdin="piped-secret-pass\n")
    assert r.returncode == 0, r.stderr
    r = shoal("accounts", "list")
    assert r.returncode == 0 and "cam-cli" in r.stdout and "site-cli" in r.stdout
    with sqlite3.connect(tmp_path / "cli.db") as conn:
        hashes = [h for (h,) in conn.execute("SELECT password_hash FROM shoal_accounts")]
    assert all(h.startswith("scrypt$") and "secret" not in h for h in hashes)
    assert shoal("accounts", "remove", "device", "cam-cli").returncode == 0
    r = shoal("accounts", "list")
    assert "cam-cli" not in r.stdout and "site-cli" in r.stdout


class _Hook(http.server.BaseHTTPRequestHandler):
    posts: list[dict] = []
    hang = threading.Event()  # set: each post is held (unanswered) until ``release``
    held = threading.Event()  # a post is being held
    release = threading.Event()

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["content-length"]))
        _Hook.posts.append(json.loads(body))
        if _Hook.hang.is_set():
            _Hook.held.set()
            _Hook.release.wait(30)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_webhook_gets_the_status_and_its_failures_never_block_routing(tmp_path):
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    th = threading.Thread(target=hook.serve_forever, args=(0.05,), daemon=True)  # shutdown() returns soon
    th.start()
    url = f"http://127.0.0.1:{hook.server_address[1]}/hook"
    c = CentralProc(tmp_path, extra=["--webhook", url, "--webhook-interval", "0.3"]).start()

    def webhook() -> dict:
        return c.call("GET", "/v1/status")[1]["webhook"]

    try:
        cl = c.account("cluster", "wh-site")
        dev = c.account("device", "wh-cam")
        c.report(cl, [model("wh-model")])
        post = wait_for(lambda: next((p for p in _Hook.posts if p["clusters"]), None), "no webhook post")
        assert post["event"] == "status" and post["clusters"][0]["name"] == "wh-site"
        assert post["clusters"][0]["models"][0]["name"] == "wh-model"
        # An endpoint that hangs: routes are answered while its post is held, and later posts are
        # skipped meanwhile rather than piled up.
        _Hook.hang.set()
        wait_for(_Hook.held.is_set, "no webhook post reached the hanging endpoint")
        failed = webhook()["failed"]
        assert c.call("POST", "/v1/route", {"model": "wh-model"}, auth=dev)[0] == 200
        assert webhook()["failed"] == failed  # the held post had not failed: the route did not wait on it
        wait_for(lambda: webhook()["skipped"] >= 1, "no post was skipped while one was held")
        # An endpoint that is gone: posts fail, routes go on.
        _Hook.release.set()
        hook.shutdown()
        hook.server_close()
        c.report(cl, [model("wh-model")])
        st = wait_for(lambda: (w := webhook())["failed"] > failed and w, "no webhook post failed")
        assert st["sent"] >= 1 and st["last_error"]
        assert c.call("POST", "/v1/route", {"model": "wh-model"}, auth=dev)[0] == 200
    finally:
        _Hook.release.set()
        c.stop()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_status_page_renders_clusters_and_models_in_headless_chromium(central):
    for name, m in (("t10-alpha", "t10-digits"), ("t10-beta", "t10-faces")):
        central.report(central.account("cluster", name), [model(m, in_flight=7)])
    code, page = central.call("GET", "/", auth=None)
    assert code == 401  # the page asks the browser for operator credentials
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                f"http://{OPERATOR[0]}:{OPERATOR[1]}@127.0.0.1:{central.port}/",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    dom = r.stdout
    assert 'data-cluster="t10-alpha"' in dom and 'data-cluster="t10-beta"' in dom, r.stderr[-2000:]
    assert "<td>t10-digits</td>" in dom and "<td>t10-faces</td>" in dom
    assert 'id="error"></div>' in dom  # refreshed without an error


def test_https_with_a_private_ca(tmp_path):
    import ssl

    pytest.importorskip("cryptography")
    from shoal.security.certs import make_ca, make_cert

    ca, _ = make_ca(tmp_path / "pki")
    cert, key = make_cert(tmp_path / "pki", "central", ["127.0.0.1"], tmp_path / "pki")
    c = CentralProc(tmp_path, extra=["--tls-cert", str(cert), "--tls-key", str(key)]).start()
    try:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", c.port, timeout=10, context=ssl.create_default_context(cafile=str(ca))
        )
        auth = base64.b64encode(f"{OPERATOR[0]}:{OPERATOR[1]}".encode()).decode()
        conn.request("GET", "/v1/status", headers={"Authorization": f"Basic {auth}"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["central"]["database"] == "sqlite"
        conn.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            untrusting = http.client.HTTPSConnection("127.0.0.1", c.port, timeout=10)
            untrusting.request("GET", "/v1/health")
    finally:
        c.stop()
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "central", "--tls-cert", str(cert), "--db", "sqlite:///x.db"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "--tls-key" in r.stderr
