import shutil
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
