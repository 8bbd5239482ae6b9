"""What a local Ray's workers log: Ray Train's placement-group cleaner loses only its "no State API" warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipelines.runtime import quiet_local_workers

CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def test_local_workers_drop_only_the_cleaners_state_api_warning(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger(CLEANER)
    before = list(logger.filters)
    try:
        quiet_local_workers()
        quiet_local_workers()  # a second call adds nothing
        assert len(logger.filters) == len(before) + 1
        with caplog.at_level(logging.DEBUG, logger=CLEANER):
            # Ray 2.60's text, verbatim (placement_group_cleaner.py)
            logger.warning(
                "Failed to query Ray Train Controller actor state. "
                "State API may be temporarily unavailable. Continuing to monitor."
            )
            logger.warning("Detected that the Ray Train controller actor (%s) is dead.", "abc")
            logging.getLogger("ray.train").warning("Failed to query Ray Train Controller actor state, elsewhere")
        assert [r.getMessage() for r in caplog.records] == [
            "Detected that the Ray Train controller actor (abc) is dead.",
            "Failed to query Ray Train Controller actor state, elsewhere",
        ]
    finally:
        logger.filters[:] = before


def test_the_cleaner_still_logs_under_the_name_filtered() -> None:
    """The filter sits on the cleaner module's logger: a Ray that renamed the module would make it a no-op."""
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    assert placement_group_cleaner.logger.name == CLEANER
    source = Path(placement_group_cleaner.__file__).read_text()
    assert "Failed to query Ray Train Controller actor state" in source
