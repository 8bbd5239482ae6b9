"""Fixtures for the data-layer tests."""

from __future__ import annotations

import pytest

from tests.pipelines.quirky_refer import QuirkyRefer, build_quirky_refer


@pytest.fixture(scope="session")
def quirky_refer(tmp_path_factory: pytest.TempPathFactory) -> QuirkyRefer:
    """The quirky REFER dataset (built once per session; treat it as read-only)."""
    return build_quirky_refer(tmp_path_factory.mktemp("quirky"))
