"""Several central replicas on one database: they migrate it once, share accounts, derive the same
cluster keys, and deliver commands that another replica stored. Run on SQLite (always) and on the
PostgreSQL server of this machine (127.0.0.1:5432; skipped with the reason when there is none)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from conftest import _pg
from test_central_server import OPERATOR, PW, CentralProc, devices_seen, key_of, model, wait_for

from shoal.central.commands import RECHECK_S
from shoal.security.tokens import verify_token


def _replicas_share_one_database(tmp_path, db: str) -> None:
    a = CentralProc(tmp_path, db=db, name="replica-a")
    b = CentralProc(tmp_path, db=db, name="replica-b")
    # Started together on an empty database: the migration lock lets exactly one create the schema.
    threads = [threading.Thread(target=c.start) for c in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert a.port and b.port, (a.log.read_text(), b.log.read_text())
        cluster = a.account("cluster", "rep-site")
        device = b.account("device", "rep-cam")
        answers = [c.report(cluster, [model("rep-model", in_flight=3)]) for c in (a, b)]
        assert answers[0]["token_key"] == answers[1]["token_key"]
        key = key_of(answers[0])
        for c in (a, b):
            code, r = c.call("POST", "/v1/route", {"model": "rep-model"}, auth=device)
            assert code == 200, r
            assert verify_token(r["token"], key, audience="rep-site")["sub"] == "rep-cam"
        # A session from one replica is good on the other.
        token = a.call("POST", "/v1/login", auth=device)[1]["token"]
        assert b.call("POST", "/v1/route", {"model": "rep-model"}, auth=token)[0] == 200

        # A command stored through replica a reaches a device waiting on replica b.
        phone = a.account("device", "rep-phone")  # never seen by b before its long poll
        got: dict[str, Any] = {}

        def poll() -> None:
            t = time.monotonic()
            got["answer"] = b.call("GET", "/v1/commands?wait=15", auth=phone)
            got["waited"] = time.monotonic() - t

        th = threading.Thread(target=poll)
        th.start()
        wait_for(lambda: "rep-phone" in devices_seen(b), "the long poll never reached replica b")
        assert th.is_alive()  # no command yet: the poll waits
        code, posted = a.call("POST", "/v1/devices/rep-phone/commands", {"command": "ping"})
        assert code == 201
        th.join(30)
        assert not th.is_alive(), "the command stored on replica a did not end the poll on replica b"
        code, answer = got["answer"]
        assert code == 200 and [c["id"] for c in answer["commands"]] == [posted["id"]]
        # Product bound: b's poller finds commands other replicas stored every second; without it the
        # poll would answer at its re-check, RECHECK_S after it began waiting.
        assert got["waited"] < RECHECK_S
        assert b.call("POST", f"/v1/commands/{posted['id']}/ack", {"result": "pong"}, auth=phone)[0] == 200
        assert a.call("GET", "/v1/status", auth=OPERATOR)[1]["commands"]["acked"] == 1
        # Both replicas list the same accounts.
        assert a.call("GET", "/v1/accounts")[1] == b.call("GET", "/v1/accounts")[1]
        assert {"rep-cam", "rep-phone"} <= {x["name"] for x in a.call("GET", "/v1/accounts")[1]["accounts"]}
        assert PW not in a.log.read_text() + b.log.read_text()
    finally:
        a.stop()
        b.stop()


def test_replicas_share_sqlite(tmp_path):
    _replicas_share_one_database(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}")


def test_replicas_share_postgresql(tmp_path, pg_url):
    _replicas_share_one_database(tmp_path, pg_url)


def test_database_gone_is_a_503_and_cached_devices_keep_routing(tmp_path, pg_url):
    c = CentralProc(tmp_path, db=pg_url).start()
    try:
        cluster = c.account("cluster", "gone-site")
        device = c.account("device", "gone-cam")
        c.report(cluster, [model("gone-model")])
        assert c.call("POST", "/v1/route", {"model": "gone-model"}, auth=device)[0] == 200
        asyncio.run(_pg(f"DROP DATABASE {pg_url.rsplit('/', 1)[1]} WITH (FORCE)"))
        # Credentials checked a moment ago need no database: routing goes on.
        c.report(cluster, [model("gone-model")])
        assert c.call("POST", "/v1/route", {"model": "gone-model"}, auth=device)[0] == 200
        code, answer = c.call("POST", "/v1/route", {"model": "gone-model"}, auth=("gone-other", PW))
        assert code == 503 and "database" in answer["error"]
        assert c.proc is not None and c.proc.poll() is None
    finally:
        c.stop()
