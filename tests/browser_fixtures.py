"""The fixtures every browser journey shares: one app server and one Chromium per module, and a
screenshot of each open page when a test fails (test-artefacts/FAILED-<test>-<k>.png).

conftest.py registers them as a plugin; a browser module adds
``pytest.mark.usefixtures("screenshot_on_failure")`` to its ``pytestmark``."""

from __future__ import annotations

import pytest
from browser_util import Browser, StreamlitServer


@pytest.fixture(scope="module")
def server():
    with StreamlitServer(timeout=120) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


@pytest.fixture
def screenshot_on_failure(request, browser):
    browser.pages = []
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        browser.shoot_open_pages(f"FAILED-{request.node.name}")
