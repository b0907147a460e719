"""A PostgreSQL server of the lab's own, for the central replicas to share: a fresh data directory
made with ``initdb`` (this machine's PostgreSQL binaries), the server run as the ``postgres`` user on
the ``db`` machine, listening on that machine's lab address only. The host's own server (if any) is
never touched: another data directory, another address, the Unix socket in the data directory.

The data directory is under ``/tmp`` (the ``postgres`` user cannot enter a root-only run folder) and
removed at teardown; the server's log is the machine's log in the run's folder.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14)]
USER = "postgres"
PORT = 5432
DATABASE = "shoal"


def bindir() -> Path | None:
    return next((b for b in BINARIES if (b / "postgres").exists()), None)


def unavailable() -> str | None:
    """Why the lab cannot run PostgreSQL here (None when it can)."""
    if bindir() is None:
        return f"no PostgreSQL server binaries under {', '.join(str(b) for b in BINARIES)}"
    if subprocess.run(["id", "-u", USER], capture_output=True).returncode != 0:
        return f"no '{USER}' user to run PostgreSQL as"
    return None


def _as_postgres(argv: list[str]) -> list[str]:
    return ["setpriv", "--reuid", USER, "--regid", USER, "--clear-groups", "--", *argv]


class LabPostgres:
    """The data directory, the server's command line and the central database's URL."""

    def __init__(self, address: str, subnet: str) -> None:
        b = bindir()
        if b is None:
            raise RuntimeError(unavailable())
        self.bin = b
        self.address = address
        self.subnet = subnet
        self.data = Path(tempfile.mkdtemp(prefix="shoal-lab-pg-"))

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@{self.address}:{PORT}/{DATABASE}"

    def init(self) -> LabPostgres:
        shutil.chown(self.data, USER, USER)
        subprocess.run(
            _as_postgres(
                [str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        with open(self.data / "pg_hba.conf", "a") as f:
            f.write(f"host all all {self.subnet} trust\n")  # the lab's machines, nobody else can reach it
        return self

    def argv(self) -> list[str]:
        """The server on the db machine: its lab address only, the socket in the data directory,
        durability traded for speed (the lab's database lives for one run)."""
        return [
            str(self.bin / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(PORT),
            "-c",
            f"listen_addresses={self.address}",
            "-c",
            f"unix_socket_directories={self.data}",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "shared_buffers=32MB",
        ]

    def create_database(self, timeout: float = 60.0) -> None:
        """The central database, over the Unix socket once the server takes connections."""
        ready = [str(self.bin / "pg_isready"), "-h", str(self.data), "-p", str(PORT), "-t", "2"]
        end = time.monotonic() + timeout
        while subprocess.run(_as_postgres(ready), capture_output=True, timeout=10).returncode != 0:
            if time.monotonic() > end:
                raise RuntimeError(f"PostgreSQL did not take connections within {timeout:g} s")
            time.sleep(0.1)
        create = [str(self.bin / "createdb"), "-h", str(self.data), "-p", str(PORT), DATABASE]
        subprocess.run(_as_postgres(create), check=True, capture_output=True, timeout=timeout)

    def remove(self) -> None:
        shutil.rmtree(self.data, ignore_errors=True)
