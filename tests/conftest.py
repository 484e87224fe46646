"""Fixtures shared by the whole suite.

The tiny configurations live in tests/tiny.py (`TINY_CONFIG`, `tiny_config`, `tiny_setup`) and
the synthetic data in tests/fixtures.py; here is what is worth building once per test run.
"""

from pathlib import Path

import pytest

from tests.fixtures import make_tiny_backbone


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT (two layers, width 32) saved as a local backbone directory: one per
    test run, read-only (each test keeps its own cache directory)."""
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))
