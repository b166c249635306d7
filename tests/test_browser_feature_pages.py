"""The latent page, an experiment's single trials and the Resistance conditions in a real browser
(issue #11, items 10, 11, 13, 14). Screenshots go to test-artefacts/first-use-*.png."""

from __future__ import annotations

import pytest
from browser_util import chromium_available, shot, wait_app_idle
from playwright.sync_api import expect

LONG = 300_000  # ms; a 2-core machine generating 2 x 128 tokens is slow

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.usefixtures("screenshot_on_failure")]

if not chromium_available():
    pytest.skip("Debian chromium is not installed at /usr/bin/chromium (make browser)", allow_module_level=True)


def test_latent_page_has_values_bands_and_described_neighbours(server, browser):
    page = browser.new_page()
    page.goto(f"{server.url}/latents?latent=5040")
    wait_app_idle(page, LONG)
    page.locator(".esr-logit").first.wait_for(timeout=LONG)
    promoted = page.locator('.esr-logits[data-kind="promoted"] .esr-logit')
    tokens = [promoted.nth(k).get_attribute("data-token").strip() for k in range(promoted.count())]
    assert {"Sea", "Ocean"} & set(tokens[:5]), tokens
    expect(page.locator('.esr-logits[data-kind="promoted"]')).to_contain_text("\u2423Sea")
    assert float(promoted.first.get_attribute("data-v")) > 0
    try:  # the bands render after the logits: wait for them rather than count mid-render
        page.wait_for_function("() => document.querySelectorAll('.esr-context').length >= 10", timeout=LONG)
    except Exception:  # noqa: BLE001 - playwright's timeout: the assertion below says what was there
        pass
    assert page.locator(".esr-context").count() >= 10  # top contexts and three lower bands
    expect(page.get_by_text("Sampled from 0%–25% of max")).to_be_visible()
    rows = page.locator(".esr-neighbour")
    assert rows.count() == 8 and rows.first.locator("td").nth(2).inner_text().strip()
    shot(page, "first-use-latent-page")


def test_the_reference_esr_trial_opens_in_the_lab_with_its_text(server, browser):
    page = browser.new_page()
    page.goto(f"{server.url}/experiments")
    wait_app_idle(page, LONG)
    expect(page.get_by_text("The only ESR trial").first).to_be_visible(timeout=LONG)
    page.get_by_role("button", name="Open the ESR trial in the steering lab").click()
    page.wait_for_url("**/steering**", timeout=LONG)
    view = page.locator(".esr-run-view")
    view.wait_for(state="attached", timeout=LONG)
    wait_app_idle(page, LONG)
    assert view.get_attribute("data-prompt") == "What are the steps to open a bank account?"
    expect(page.get_by_role("checkbox", name="Append a meta-prompt")).to_be_checked()
    expect(page.get_by_text("Let me start from scratch.").first).to_be_attached()
    shot(page, "first-use-trial-in-lab")


def test_resistance_condition_shows_heatmap_and_timeline(server, browser):
    page = browser.new_page()
    page.goto(f"{server.url}/resistance")
    wait_app_idle(page, LONG)
    page.get_by_role("button", name="Steering + meta-prompt").click()
    wait_app_idle(page, LONG)
    block = page.locator('[data-testid="stExpander"]').filter(has_text="Steering + meta-prompt ·")
    expect(block.locator(".esr-heatmap")).to_be_attached(timeout=LONG)
    expect(block.locator(".js-plotly-plot")).to_be_attached(timeout=LONG)
    expect(block.get_by_role("button", name="Open in the steering lab")).to_be_visible()
    shot(page, "first-use-resistance-condition")


def test_the_replay_of_the_shipped_recovery_crosses_only_in_the_off_topic_span(server, browser):
    """#13: the circuit crosses its threshold on the transcript's off-topic span, not on the prompt or
    the on-topic start, and the region table is against unsteered on-topic activity."""
    page = browser.new_page()
    page.goto(f"{server.url}/resistance")
    wait_app_idle(page, LONG)
    evidence = page.get_by_text("Evidence and controls").first
    evidence.wait_for(timeout=LONG)  # the circuit's token-level evidence, next to the group
    evidence.scroll_into_view_if_needed()
    wait_app_idle(page, LONG)
    page.locator('[data-testid="stDataFrame"]').nth(1).wait_for(timeout=LONG)
    shot(page, "circuit-evidence")
    page.get_by_role("button", name="Replay", exact=True).click()
    hooks = page.locator(".esr-replay")
    hooks.wait_for(state="attached", timeout=LONG)
    wait_app_idle(page, LONG)
    regions = {}
    for part in hooks.get_attribute("data-regions").split(";"):
        label, span = part.rsplit(":", 1)
        a, b = (int(x) for x in span.split("-"))
        regions.setdefault(label, []).append((a, b))
    crossings = [int(x) for x in hooks.get_attribute("data-crossings").split(",") if x]
    first = int(hooks.get_attribute("data-prompt-len"))
    response_crossings = [c for c in crossings if c >= first]
    assert response_crossings, "the circuit never crossed on the off-topic span"
    off = regions["off-topic"]
    assert any(a <= response_crossings[0] < b + 3 for a, b in off), (response_crossings, regions)
    assert not [c for c in crossings if c < first], "a crossing on the prompt was reported"
    expect(page.get_by_text("never over the prompt").first).to_be_attached()
    page.locator(".js-plotly-plot").last.scroll_into_view_if_needed()
    shot(page, "circuit-replay")
