"""Watch a recovery (#12): Home's example on the resistance-tuned model, in a real browser.

Opened from Home on the default model, so the example's "Switch to ... and open" switches the sidebar.

The example drifts under steering, the circuit crosses its threshold, the model says a restart
phrase after the drift and answers the task: checked on the run's own tokens (the resistance
line's data-* hooks) and on the judge's verdict. Screenshots: test-artefacts/recovery-*.png.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from browser_util import Browser, StreamlitServer, chromium_available, shot, wait_app_idle

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = json.loads((REPO / "assets" / "examples.json").read_text())["examples"]
RECOVERY = next(e for e in EXAMPLES if e.get("model") == "smollm2-135m-esr")
LONG = 300_000  # ms: the first load merges the adapter into the cache

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not chromium_available():
    pytest.skip("Debian chromium is not installed at /usr/bin/chromium (make browser)", allow_module_level=True)


def test_the_home_recovery_example_drifts_crosses_the_circuit_restarts_and_recovers():
    with StreamlitServer(timeout=120) as srv, Browser() as b:
        page = b.new_page()
        try:
            _journey(page, srv)
        except Exception:
            shot(page, "FAILED-recovery-home-example")
            raise


def _journey(page, srv) -> None:
    page.goto(srv.url + "/")  # Home on the default model: the recovery example is on another model
    page.get_by_text(RECOVERY["title"]).wait_for(timeout=LONG)
    wait_app_idle(page, LONG)
    button = page.get_by_role("button", name=re.compile(r"^Switch to .* and open$")).first
    for _ in range(3):  # a click that lands during a rerun is dropped by the browser: click again
        button.click()
        try:
            page.wait_for_url(re.compile(r"/steering"), timeout=30_000)
            break
        except Exception:  # noqa: BLE001 - playwright's timeout: still on Home
            wait_app_idle(page, LONG)
    # the sidebar's picker follows the switch (the browser resends the old value on the next run)
    page.get_by_text("smollm2-135m-esr").first.wait_for(timeout=LONG)
    # the lab loads the tuned model, applies the example and streams it: wait for the finished run
    page.locator(".esr-run-view").wait_for(state="attached", timeout=LONG)
    page.wait_for_function("() => !document.querySelector('.esr-live')", timeout=LONG)
    wait_app_idle(page, LONG)
    view = page.locator(".esr-run-view")
    assert view.get_attribute("data-model") == "smollm2-135m-esr"
    assert view.get_attribute("data-prompt") == RECOVERY["prompt"]
    line = page.locator('.esr-resistance[data-run="steered"]')
    line.wait_for(state="attached", timeout=LONG)
    crossing = line.get_attribute("data-crossing")
    restarts = [int(x) for x in (line.get_attribute("data-restarts") or "").split(",") if x]
    assert crossing not in (None, ""), "the circuit never crossed its threshold"
    assert restarts, "no restart phrase in the steered run"
    assert restarts[0] >= 8, f"the restart comes at token {restarts[0]}, before any drift"
    assert line.locator(".esr-circuit").count() == 1  # the threshold badge, kept for the finished run
    assert int(crossing) <= restarts[0] + 8, "the circuit crossed long after the restart"
    page.locator('.esr-verdict[data-verdict="esr"]').first.wait_for(state="attached", timeout=LONG)
    shot(page, "recovery-home-example")
    page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
    shot(page, "recovery-home-example-timeline")
    page.context.close()
