"""Fixtures shared by the whole suite.

The tiny configurations live in tests/tiny.py (`TINY_CONFIG`, `tiny_config`, `tiny_setup`) and
the synthetic data in tests/fixtures.py; here is what is worth building once per test run.
"""

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs three workers on two cores
    # one thread each, for torch here and in the processes tests start (ClientApps, Ray):
    # torch's default of a thread per core, twice over, slows small steps many times over
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

import pytest

from tests.fixtures import make_synthetic_dataset, make_tiny_backbone


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (a stable sort): `make test` hands pytest-xdist's workers one test at
    a time (--maxschedchunk 1), so the long ones start at once, on different workers, and the
    quick ones fill in around them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT (two layers, width 32) saved as a local backbone directory: one per
    test run, read-only (each test keeps its own cache directory)."""
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path) -> tuple[Path, Path]:
    """The tiny backbone and a synthetic data set of 24 users (tests/tiny.py's
    `tiny_cfg` federates it): one per test module."""
    root = tmp_path_factory.mktemp("world")
    return tiny_backbone, make_synthetic_dataset(root / "data", num_users=24)
