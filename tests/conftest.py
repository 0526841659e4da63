"""Shared fixtures. Each fixture is self-contained; add yours below in its own block."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from parafold.testdata import TestdataSummary

# --- synthetic databases (parafold.testdata) ---


@pytest.fixture(scope="session")
def synthetic_db_summary(tmp_path_factory: pytest.TempPathFactory) -> TestdataSummary:
    """The default tiny synthetic database set, built once per test session (~10-20 s)."""
    from parafold.testdata import build_testdata

    return build_testdata(tmp_path_factory.mktemp("synthetic") / "db")


@pytest.fixture(scope="session")
def synthetic_db(synthetic_db_summary: TestdataSummary) -> Path:
    """Root of the default synthetic database set (AlphaFold layout, queries.fasta, truth.tsv)."""
    return Path(synthetic_db_summary.root)


# --- model weights ---


@pytest.fixture(scope="session")
def tiny_params(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights of the tiny config for model 1 (AlphaFold's params layout), written once
    per test session, for runs whose fold workers are fakes but whose start checks the params."""
    from parafold.fold.params import write_random_params
    from parafold.fold.settings import ModelSettings

    root = tmp_path_factory.mktemp("tiny_params")
    write_random_params(root, ModelSettings(config_size="tiny", models=(1,)))
    return root
