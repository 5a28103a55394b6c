"""The ComfyUI API versions the simulator speaks, as a parametrised fixture for end-to-end tests.

A test that takes ``comfy_api`` runs once per version: the simulator started by anything in that
test (directly, or as the daemon's ComfyUI) speaks it, through ``SIM_API_VERSION`` in the
environment, which the daemon and its children inherit. tests/conftest.py registers this module
as a plugin, so a test only names the fixture.
"""

from __future__ import annotations

import pytest

#: ComfyUI 0.3.64 (October 2025, as observed) and the newest line that could be read.
API_VERSIONS = ("0.3.64", "0.38.1")
NEWEST = API_VERSIONS[-1]


@pytest.fixture(params=API_VERSIONS, ids=[f"comfyui-{v}" for v in API_VERSIONS])
def comfy_api(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The API version this run of the test speaks ("0.3.64" or "0.38.1")."""
    monkeypatch.setenv("SIM_API_VERSION", request.param)
    return request.param
