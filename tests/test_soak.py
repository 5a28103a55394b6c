"""A short seeded chaos soak: every fault kind once under load, then every check (issue 11).

`make soak` runs the same for minutes; this one lasts about a minute and a half.
"""

from __future__ import annotations

import pytest

from tests.soak.__main__ import soak
from tests.soak.checks import render
from tests.soak.faults import KINDS

pytestmark = pytest.mark.e2e


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_short_seeded_soak_loses_nothing(tmp_path):
    report = await soak(seconds=52, seed=11, rps=2.0, folder=tmp_path, gap=4.0)
    text = render(report)
    assert {f["kind"] for f in report.faults} == set(KINDS), text
    assert not report.failures, text
    assert len(report.lost) == 0 and not report.answers.get("500"), text
    assert report.answers.get("200", 0) > 0 and report.outputs_checked > 0, text
    assert report.webhooks_expected > 0, text
