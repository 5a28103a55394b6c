"""Shared test hygiene, and the plugins of tests/support: their fixtures (so a test names a
fixture and no test module imports another) and the tiers' guard (tests/support/tiers.py)."""

from __future__ import annotations

import logging

import pytest

pytest_plugins = ["tests.support.tiers", "tests.support.moto_server", "tests.support.fake_autoscaler",
                  "tests.support.comfy_modes", "tests.support.timeouts"]


@pytest.fixture(autouse=True)
def _restore_logging():
    """CLI commands configure logging for their process; under CliRunner that process is the
    test run, so put the root logger back as it was after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logger.level for name, logger in logging.Logger.manager.loggerDict.items()
              if isinstance(logger, logging.Logger)}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)
