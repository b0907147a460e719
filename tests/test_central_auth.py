"""Central's authenticator against a stand-in database (no server, no sockets): which logins run the
password hash, device cookies, and credentials honoured while the database does not answer."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest

from shoal.central import passwords
from shoal.central.auth import Authenticator
from shoal.central.config import CentralConfig
from shoal.central.db import DatabaseTimeout
from shoal.central.errors import HttpError
from shoal.central.keys import Keys

PW = "device-password"


class FakeStore:
    def __init__(self, accounts: dict[tuple[str, str], str]) -> None:
        self.accounts = accounts
        self.hung = False
        self.queries = 0

    async def password_hash(self, kind: str, name: str) -> str | None:
        self.queries += 1
        if self.hung:
            await asyncio.sleep(0.05)  # the query timeout, shortened
            raise DatabaseTimeout("the database did not answer within 0.05 s")
        return self.accounts.get((kind, name))


def basic(name: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


@pytest.fixture
def auth(monkeypatch):
    store = FakeStore({("device", n): passwords.hash_password(PW, n=2**10) for n in ("cam", "cam-2", "victim")})
    keys = Keys()
    keys.load(b"m" * 32)
    a = Authenticator(store, keys, CentralConfig())  # type: ignore[arg-type]
    a.hashes = 0
    verify = passwords.verify_password

    def counted(password: str, stored: str) -> bool:
        a.hashes += 1
        return verify(password, stored)

    monkeypatch.setattr(passwords, "verify_password", counted)
    return a


async def status_of(a: Authenticator, name: str, password: str, cookie: str | None = None) -> int:
    try:
        await a.check(basic(name, password), "10.0.0.1", "device", headers={"shoal-device-cookie": cookie or ""})
    except HttpError as e:
        return e.status
    return 200


def test_unknown_names_run_no_hash_and_wait_like_a_check(auth, monkeypatch):
    waits: list[float] = []
    all_in = asyncio.Event()
    serial: list[int] = []

    async def wait(seconds: float) -> None:
        """An unknown name's wait: recorded, then held until all 200 are waiting at once."""
        waits.append(seconds)
        if len(waits) == 200:
            all_in.set()
        try:
            await asyncio.wait_for(all_in.wait(), 10)
        except asyncio.TimeoutError:  # waits taken one after another: never all 200 at once
            serial.append(len(waits))
            all_in.set()

    async def go():
        auth.hash_times._times.clear()
        auth.hash_times.record(0.05)
        monkeypatch.setattr(asyncio, "sleep", wait)
        return await asyncio.gather(*(status_of(auth, f"ghost-{i}", "guess") for i in range(200)))

    got = asyncio.run(go())
    assert got == [401] * 200 and auth.hashes == 0 and auth.unknown == 200 and auth.failures == 0
    # Each waited as long as a check takes (the one time recorded), all at once.
    assert waits == [0.05] * 200 and serial == []


def test_a_burst_of_guesses_gets_no_more_checks_than_the_throttle_allows(auth):
    async def go():
        return await asyncio.gather(*(status_of(auth, "victim", f"guess-{i}") for i in range(50)))

    got = asyncio.run(go())
    # As one after another: 3 free failures and the one that blocks; the other 46 waited and were refused.
    assert auth.hashes <= 4 and got.count(401) == auth.hashes and got.count(429) == 50 - auth.hashes


def test_many_names_guessed_from_one_address_lock_out_no_one_else_there(auth):
    async def go():
        for i in range(30):
            await status_of(auth, f"ghost-{i}", "guess")
        for _ in range(5):
            await status_of(auth, "victim", "guess")
        return await status_of(auth, "cam", PW)  # a first login from the same address

    assert asyncio.run(go()) == 200


def test_a_client_with_its_cookie_gets_in_while_its_password_is_guessed(auth):
    async def go():
        login = await auth.check(basic("cam", PW), "10.0.0.1", "device")
        assert login[1]  # a device cookie, handed out after the full check
        auth.verified.forget_all()  # its check has left the cache
        for i in range(10):
            await status_of(auth, "cam", f"guess-{i}")
        untrusted = await status_of(auth, "cam", PW)
        known = await auth.check(basic("cam", PW), "10.0.0.9", "device", headers={"shoal-device-cookie": login[1]})
        auth.verified.forget_all()
        others = await status_of(auth, "cam", PW, cookie=(await auth.check(basic("cam-2", PW), "x", "device"))[1])
        return untrusted, known, others

    untrusted, known, others = asyncio.run(go())
    assert untrusted == 429 and known[0] == "cam" and known[1]
    assert others == 429  # another account's cookie is no cookie


def test_stale_credentials_work_only_while_the_database_does_not_answer(auth):
    async def attempt(header: str, session: bool = False) -> str:
        try:
            return (await auth.check(header, "a", "device", session=session))[0]
        except DatabaseTimeout:
            return "503"
        except HttpError as e:
            return str(e.status)

    async def go():
        store = auth.store
        await auth.check(basic("cam", PW), "a", "device")
        session = auth.session("cam-2").token
        await auth.check(f"Bearer {session}", "a", "device", session=True)
        aged = time.monotonic() - 60  # checked a minute ago: past the fresh time, within the stale time
        auth.verified._entries = dict.fromkeys(auth.verified._entries, aged)
        auth._exists = dict.fromkeys(auth._exists, aged)
        store.hung = True
        during = [await attempt(basic("cam", PW)) for _ in range(5)]
        asked = store.queries
        during.append(await attempt(f"Bearer {session}", session=True))
        during += [await attempt(basic("victim", PW)), await attempt(basic("cam", "wrong"))]
        probe = auth._probe
        assert probe is not None  # a stale login started one
        await probe
        assert auth.outage.down  # the background probe found it still down
        auth.forget()  # an account removed here: nothing stale is honoured any more
        removed = await attempt(basic("cam", PW))
        store.hung = False
        if auth._probe is not None:
            await auth._probe  # one still asking the hung database ends first
        after = await attempt(basic("cam", PW))
        return during, asked, removed, after

    during, asked, removed, after = asyncio.run(go())
    assert during == ["cam"] * 5 + ["cam-2", "503", "503"], during
    assert asked <= 4  # one query found the outage; then a probe at a time, not one per login
    assert removed == "503" and after == "cam" and not auth.outage.down and auth.stale >= 6


def test_logins_waiting_on_one_account_do_not_each_wait_out_the_outage(auth):
    async def go():
        await auth.check(basic("cam", PW), "a", "device")
        auth.verified._entries = dict.fromkeys(auth.verified._entries, time.monotonic() - 60)
        auth.store.hung = True
        got = await asyncio.gather(*(status_of(auth, "cam", PW) for _ in range(10)))
        return got, auth.store.queries

    got, queries = asyncio.run(go())
    assert got == [200] * 10 and queries <= 3  # the first found the outage; a probe or two besides


def test_stale_credentials_expire(auth):
    async def go():
        await auth.check(basic("cam", PW), "a", "device")
        auth.verified._entries = dict.fromkeys(auth.verified._entries, time.monotonic() - 301)
        auth.store.hung = True
        return await status_of(auth, "cam", PW)

    with pytest.raises(DatabaseTimeout):
        asyncio.run(go())


def test_the_verified_cache_is_fresh_then_stale_then_gone():
    c = passwords.VerifiedCache(ttl_s=10, stale_s=300, max_entries=3)
    c.add("device", "cam", "pw", now=0)
    assert c.hit("device", "cam", "pw", now=9) and not c.hit("device", "cam", "pw", now=11)
    assert c.hit_stale("device", "cam", "pw", now=299) and not c.hit_stale("device", "cam", "pw", now=301)
    for i in range(4):
        c.add("device", f"d{i}", "pw", now=400 + i)
    assert len(c._entries) == 3 and not c.hit_stale("device", "d0", "pw", now=410)  # the oldest went


def test_an_outage_starts_and_ends_once():
    o = passwords.Outage()
    assert [o.failed(1.0), o.failed(2.0)] == [True, False] and o.down and o.since == 1.0
    assert [o.answered(), o.answered()] == [True, False] and not o.down


def test_the_device_client_keeps_its_cookie_and_sends_it_to_central():
    from shoal.client.core import Call, ClientCore, Finished, Reply, resume

    core = ClientCore("http://central:7000", "cam", PW, clock=lambda: 0.0)
    sent: list[Call] = []
    answers = [
        Reply(404, {"shoal-device-cookie": "cookie-1"}, b'{"error": "no live cluster serves echo"}'),
        Reply(200, {}, b'{"commands": []}'),
    ]

    def run(flow):
        outcome = None
        while not isinstance(step := resume(flow, outcome), Finished):
            sent.append(step)
            outcome = answers.pop(0)
        return step.value

    with pytest.raises(Exception, match="no live cluster"):
        run(core.route("echo"))
    run(core.commands(0, 1.0))
    assert "Shoal-Device-Cookie" not in sent[0].headers and core.cookie == "cookie-1"
    assert sent[1].headers["Shoal-Device-Cookie"] == "cookie-1"
