"""Packaged models and benchmark data for tests: skip where absent, fail where promised.

``make test`` installs the packaged assets (``edgefed assets``) before pytest runs, and CI
sets ``EDGEFED_REQUIRE_ASSETS=1`` so a missing asset fails instead of skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgefed import assets
from edgefed.data.sources import data_dir
from schemas.errors import AssetMissing

REQUIRE_ASSETS = "EDGEFED_REQUIRE_ASSETS"


def _missing(reason: str) -> None:
    if os.environ.get(REQUIRE_ASSETS) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ASSETS}=1 says it must be there")
    pytest.skip(reason)


def require_smollm2() -> Path:
    """The converted SmolLM2 folder (and the Rotten Tomatoes corpus beside it)."""
    try:
        assets.rotten_tomatoes_csv()
        return assets.smollm2_dir()
    except AssetMissing as exc:
        _missing(str(exc))
        raise


def require_minilm() -> Path:
    """The packaged all-MiniLM-L6-v2 folder."""
    try:
        assets.rotten_tomatoes_csv()
        return assets.minilm_dir()
    except AssetMissing as exc:
        _missing(str(exc))
        raise


def require_data_dir() -> Path:
    """The benchmark data directory (``EDGEFED_DATA_DIR`` or ``../shared/data``)."""
    root = data_dir()
    if root is None or not root.is_dir():
        _missing("no benchmark data directory (EDGEFED_DATA_DIR or ../shared/data)")
        raise AssertionError("unreachable")
    return root
