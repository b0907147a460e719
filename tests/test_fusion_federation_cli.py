"""``shoal federation``: keys, the Flower app it submits, and clear errors for bad input (no network)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from shoal.cli import main
from shoal.fusion.federation import make_site_keys, write_app

tomli = pytest.importorskip("tomli", reason="comes with Flower (scripts/flower-requirements.txt)")


def test_site_keys_private_stays_private(tmp_path: Path) -> None:
    priv, pub = make_site_keys(tmp_path, "hospital-a")
    assert priv.stat().st_mode & 0o777 == 0o600
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ") and pub.read_text().rstrip().endswith(
        "hospital-a"
    )
    assert b"OPENSSH PRIVATE KEY" in priv.read_bytes()


def test_the_app_names_shoals_server_and_client(tmp_path: Path) -> None:
    app = write_app(tmp_path / "app", {"sites": "a b", "rounds": 3})
    doc = tomli.loads((app / "pyproject.toml").read_text())
    flwr = doc["tool"]["flwr"]["app"]
    assert flwr["components"] == {
        "serverapp": "shoal.fusion.flower_app:server_app",
        "clientapp": "shoal.fusion.flower_app:client_app",
    }
    assert flwr["config"] == {"sites": "a b", "rounds": 3} and doc["project"]["dependencies"] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["site", "--superlink", "127.0.0.1:1", "--data", "/no/such/folder"], "does not exist"),
        (["superlink", "--certs", "/no/such/pki"], "missing; make it with 'shoal certs"),
        (["run", "--sites", "a", "--template", "/no/such/model/1"], "not a model version folder"),
        (
            ["run", "--sites", "a", "--template", "paper:wisconsin", "--fuse-every", "often"],
            "bad fusion interval",
        ),
    ],
)
def test_bad_input_is_refused_with_the_reason(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["federation", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was written


def test_a_site_the_superlink_refuses_is_started_again_until_it_is_taken(tmp_path, monkeypatch):
    """After a site's machine crashed, the SuperLink holds its node as online until its heartbeats
    are missed (a minute) and refuses the restarted SuperNode (exit 305); the site keeps starting it
    again within --max-wait (the lab found a crashed site that never rejoined its federation)."""
    from shoal.fusion.federation import SUPERNODE_REFUSED, run_site

    tries = tmp_path / "tries"
    # A stand-in SuperNode: refused twice (Flower says so, then exits with 1), then taken (runs, ends 0).
    refused = SUPERNODE_REFUSED.decode()
    code = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = len(p.read_text()) if p.exists() else 0;"
        f"p.write_text('x' * (n + 1)); print('{refused}' if n < 2 else 'taken'); sys.exit(1 if n < 2 else 0)"
    )
    assert run_site([sys.executable, "-c", code, str(tries)], dict(os.environ), 10.0, first_delay=0.01) == 0
    assert tries.read_text() == "xxx"
    # Refused for longer than --max-wait: it gives up with the SuperNode's status.
    tries.unlink()
    always = f"import sys; open(sys.argv[1], 'a').write('x'); print('{refused}'); sys.exit(1)"
    assert run_site([sys.executable, "-c", always, str(tries)], dict(os.environ), 0.05, first_delay=0.01) == 1
    assert 2 <= len(tries.read_text()) <= 4
    # Refused but still up (Flower's executor goes on retrying): ended, and started again.
    tries.unlink()
    hangs = (
        "import pathlib, sys, time; p = pathlib.Path(sys.argv[1]); n = len(p.read_text()) if p.exists() else 0;"
        f"p.write_text('x' * (n + 1)); print('{refused}' if n < 1 else 'taken', flush=True);"
        "time.sleep(600 if n < 1 else 0)"
    )
    from shoal.fusion import federation

    monkeypatch.setattr(federation, "REFUSED_EXIT_S", 0.1)
    assert run_site([sys.executable, "-c", hangs, str(tries)], dict(os.environ), 10.0, first_delay=0.01) == 0
    assert tries.read_text() == "xx"
    # Any other end is the site's end.
    assert run_site([sys.executable, "-c", "import sys; sys.exit(3)"], dict(os.environ), 10.0) == 3
