import asyncio
import os
import shutil
import uuid
from pathlib import Path

import pytest

import shoal
from shoal.local import LocalCluster

BUNDLED = Path(shoal.__file__).parent / "bundled" / "models"
TEST_MODELS = Path(__file__).parent / "models"


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory) -> Path:
    """A model repository with the bundled models and the test-only ones."""
    repo = tmp_path_factory.mktemp("repo")
    for src in (BUNDLED, TEST_MODELS):
        for m in src.iterdir():
            if m.is_dir():
                shutil.copytree(m, repo / m.name, dirs_exist_ok=True)
    return repo


@pytest.fixture
def cluster(tmp_path):
    """Start real gateways (and their workers) as processes; all of them stop at the end."""
    started: list[LocalCluster] = []

    def make(name: str = "cluster", gateway_args: list[str] | None = None) -> LocalCluster:
        lc = LocalCluster(tmp_path / name, name=name, gateway_args=gateway_args or [])
        started.append(lc)
        return lc.start()

    yield make
    for lc in started:
        lc.stop()


PG_ADMIN = os.environ.get("SHOAL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


async def _pg(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database on this machine's server, dropped afterwards; skips, saying why,
    where there is no server or driver."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        pytest.skip("asyncpg is not installed (pip install -e '.[central]')")
    name = f"shoal_test_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_pg(f"CREATE DATABASE {name}"))
    except Exception as e:  # no server, no driver for it, or no right to create a database
        pytest.skip(f"no PostgreSQL server to test against at {PG_ADMIN}: {e}")
    yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    asyncio.run(_pg(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
