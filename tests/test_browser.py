"""The app in a real browser: `streamlit run` + Debian's chromium driven by Playwright.

Covers what AppTest cannot: real token streaming, the Stop button stopping the work, plotly
rendering, the shared URL, file upload, and two sessions generating at once with different
steering (each must match the same spec run alone through the engine).
Screenshots go to test-artefacts/.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from urllib.parse import urlencode

import pytest
from browser_util import ARTEFACTS, chromium_available, shot, wait_app_idle
from playwright.sync_api import expect

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SAE = REPO / "assets" / "sae" / "smollm2-135m-instruct"
EXAMPLE = json.loads((REPO / "assets" / "examples.json").read_text())["examples"][0]
LONG = 180_000  # ms; the model is slow on a loaded 2-core machine

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.usefixtures("screenshot_on_failure")]

if not chromium_available():
    pytest.skip("Debian chromium is not installed at /usr/bin/chromium (make browser)", allow_module_level=True)
if not (DEFAULT_SAE / "cfg.json").exists() and not os.environ.get("ESR_LAB_DEFAULT_SAE"):
    pytest.skip(f"the default SAE is not in {DEFAULT_SAE} yet", allow_module_level=True)


def steering_url(server, **params) -> str:
    return f"{server.url}/steering?{urlencode(params)}"


def live_count(page, run: str) -> int:
    el = page.locator(f'.esr-live[data-run="{run}"]')
    return int(el.get_attribute("data-n")) if el.count() else -1


def wait_results(page) -> None:
    """The finished (or stopped) run's heatmaps are on the page."""
    page.locator(".esr-heatmap").first.wait_for(timeout=LONG)
    page.wait_for_function("() => document.querySelectorAll('.esr-heatmap').length >= 2", timeout=LONG)


def set_input(page, label: str, value: str) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(value)
    box.press("Enter")


def download_run(page) -> dict:
    with page.expect_download(timeout=LONG) as dl:
        page.get_by_role("button", name="Download this run (JSON)").click()
    return json.loads(Path(dl.value.path()).read_text())


def click_timeline_point(page, trace: int = 0, point: int = 3) -> tuple[str, int]:
    """Click a real marker of the plotly timeline with the mouse; (run, token) of the point plotly reports."""
    page.evaluate("""() => { const gd = document.querySelector('.js-plotly-plot');
        window.__esrClicks = [];
        gd.on('plotly_click', d => window.__esrClicks.push(d.points.map(p => p.customdata))); }""")
    marker = page.locator(".js-plotly-plot .scatterlayer .trace").nth(trace).locator(".points path").nth(point)
    marker.wait_for(timeout=LONG)
    marker.scroll_into_view_if_needed()
    box = marker.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.click(x, y)
    page.wait_for_function("() => window.__esrClicks && window.__esrClicks.length > 0", timeout=LONG)
    run, idx, _tok = page.evaluate("() => window.__esrClicks[0][0]")
    return str(run), int(idx)


def svg_texts(page, selector: str) -> list[str]:
    """Text of SVG elements (plotly legend entries, annotations): SVG has no innerText."""
    return page.locator(selector).evaluate_all("els => els.map(e => e.textContent)")


def choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the Streamlit selectbox labelled ``label`` (opened again if a rerun
    that was still settling closed the list)."""
    for attempt in range(3):
        page.get_by_label(label, exact=True).click()
        opt = page.get_by_role("option", name=option, exact=True)
        try:
            opt.wait_for(timeout=15_000)
        except Exception:  # noqa: BLE001 - closed by a rerun: open it again
            if attempt == 2:
                raise
            wait_app_idle(page, LONG)
            continue
        opt.click()
        return


def test_search_steer_stream_heatmap_timeline_and_shared_url(server, browser):
    page = browser.new_page()
    page.goto(server.url)
    page.get_by_role("button", name="Open in the steering lab").first.wait_for(timeout=LONG)
    page.get_by_text("d_sae").first.wait_for(timeout=LONG)  # the sidebar says what is loaded
    shot(page, "home-page")
    page.goto(server.url + "/latents")
    page.get_by_text("Find latents").first.wait_for(timeout=LONG)
    has_catalog = page.get_by_text("No latent catalog for this SAE yet").count() == 0
    query = "ocean" if has_catalog else str(EXAMPLE["latent"])
    set_input(page, "Search descriptions (words, or latent ids like 12 40)", query)
    first = page.locator("button").filter(has_text=re.compile(r"^#\d+$")).first
    first.wait_for(timeout=LONG)
    latent = int(first.inner_text().strip("#"))
    first.click()
    page.get_by_text(f"Latent #{latent}").wait_for(timeout=LONG)
    shot(page, "latents-page")
    page.get_by_role("button", name="Steer with this").click()
    page.get_by_text("Steering lab").first.wait_for(timeout=LONG)
    page.get_by_text(f"add #{latent} +0.8×‖h‖ (all)").wait_for(timeout=LONG)
    set_input(page, "Max new tokens", "6")
    page.wait_for_function("() => location.search.includes('n=6')", timeout=LONG)

    page.get_by_role("button", name="Generate").click()
    # both answers stream: each column shows tokens while the run is still going
    page.wait_for_function(
        "() => ['steered','default'].every(r => { const e = document.querySelector(`.esr-live[data-run=${r}]`);"
        " return e && +e.dataset.n >= 1; })", timeout=LONG)
    shot(page, "steering-streaming")
    wait_results(page)
    page.locator(".js-plotly-plot").first.wait_for(timeout=LONG)
    page.get_by_text(re.compile(r"steered · 6 tokens")).wait_for(timeout=LONG)
    shot(page, "steering-lab")
    toks = page.locator(".esr-heatmap").first.locator(".esr-tok")
    assert toks.count() == 6
    assert toks.first.get_attribute("title").startswith("#0")

    # a click on a point of the timeline selects that token and shows its top latents
    run, idx = click_timeline_point(page, trace=0, point=3)
    assert run in ("steered", "default") and idx == 3
    panel = page.locator(".esr-selected-token")
    expect(panel).to_have_attribute("data-index", str(idx), timeout=LONG)
    expect(panel).to_have_attribute("data-run", run, timeout=LONG)
    expect(panel).to_contain_text(f"Top latents at token {idx}", timeout=LONG)
    heat = page.locator(".esr-heatmap").nth(["steered", "default"].index(run)).locator(f'.esr-tok[data-i="{idx}"]')
    expect(heat).to_have_attribute("style", re.compile("outline:2px solid #000"), timeout=LONG)  # marked too
    tip = heat.get_attribute("title")
    tip_latents = re.findall(r"#(\d+): ", tip.split("top latents:")[1]) if "top latents:" in tip else []
    shown = [x for x in (panel.get_attribute("data-latents") or "").split(",") if x]
    assert shown[:5] == tip_latents  # the panel lists that token's top latents (the tooltip shows the first 5)
    if shown:  # and the table under it names them
        table = page.get_by_test_id("stTable").filter(has_text="description").last
        assert shown[0] in table.inner_text()
    panel.scroll_into_view_if_needed()
    shot(page, "timeline-click")
    # the chart is redrawn with the selection marked; a second click on it selects again
    wait_app_idle(page, LONG)
    run2, idx2 = click_timeline_point(page, trace=0, point=1)
    assert idx2 == 1
    expect(panel).to_have_attribute("data-index", "1", timeout=LONG)
    expect(panel).to_have_attribute("data-run", run2, timeout=LONG)

    # colouring by a group of several latents: each latent on its own scale, and the legend says so
    wait_app_idle(page, LONG)
    choose(page, "Colour tokens by", "group backtracking")
    legend = page.locator(".esr-legend").first
    expect(legend).to_contain_text("group backtracking · each latent ÷", timeout=LONG)
    page.get_by_text("raw sum", exact=True).click()
    expect(legend).to_contain_text("group backtracking · raw weighted sum", timeout=LONG)

    url = page.url
    assert f"iv={latent}%3Aadd%3A0.8%3Anorm%3Aall" in url or f"iv={latent}:add:0.8:norm:all" in url
    other = browser.new_page()
    other.goto(url)
    other.get_by_text(f"add #{latent} +0.8×‖h‖ (all)").wait_for(timeout=LONG)
    expect(other.get_by_role("textbox", name="Prompt", exact=True)).to_have_value("How do I boil an egg?", timeout=LONG)
    expect(other.get_by_label("Max new tokens", exact=True)).to_have_value("6", timeout=LONG)
    other.context.close()

    # an invalid uploaded file gives a clear error and the page stays usable
    bad = ARTEFACTS / "not-a-run.json"
    bad.write_text("{this is not json")
    page.locator('input[type="file"]').last.set_input_files(str(bad))
    page.get_by_text("Could not open not-a-run.json").wait_for(timeout=LONG)
    assert page.get_by_role("button", name="Generate").is_enabled()
    page.context.close()


def test_stop_really_stops_a_long_generation(server, browser):
    page = browser.new_page()
    page.goto(steering_url(server, p="Write a long story about a lighthouse keeper.", n="400",
                           iv=f"{EXAMPLE['latent']}:add:0.8:norm:all"))
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(
        "() => { const e = document.querySelector('.esr-live[data-run=steered]'); return e && +e.dataset.n >= 2; }",
        timeout=LONG)
    page.get_by_test_id("stMainBlockContainer").get_by_role("button", name="Stop").click()
    page.get_by_text("This run was stopped before the end").wait_for(timeout=LONG)
    wait_results(page)
    head = page.get_by_text(re.compile(r"steered · \d+ tokens · cancelled")).inner_text()
    n_stopped = int(re.search(r"(\d+) tokens", head).group(1))
    assert 2 <= n_stopped < 400
    # the work is over: no live stream on the page, and a new run can start at once (the script is idle)
    assert page.locator(".esr-live").count() == 0
    shot(page, "steering-stopped")
    kept = page.get_by_text(re.compile(r"Stopped: kept \d+ steered")).inner_text()
    assert int(re.search(r"kept (\d+) steered", kept).group(1)) == n_stopped
    page.context.close()


def test_two_sessions_generate_at_once_with_different_steering(server, browser):
    from esr_core.steering.engines import get_engine
    from esr_core.steering.spec import GenerationSpec

    lat = int(EXAMPLE["latent"])
    specs = {"a": dict(p="How do I boil an egg?", n="6", seed="0", iv=f"{lat}:add:0.8:norm:all"),
             "b": dict(p="How do I boil an egg?", n="6", seed="0", iv=f"{lat}:add:-0.8:norm:all,811:add:0.8:norm:all")}
    pages = {k: browser.new_page() for k in specs}
    for k, page in pages.items():
        page.goto(steering_url(server, **specs[k]))
        page.get_by_role("button", name="Generate").wait_for(timeout=LONG)
    for page in pages.values():  # click both before either finishes
        page.get_by_role("button", name="Generate").click()
    for page in pages.values():
        page.wait_for_function("() => document.querySelector('.esr-live')", timeout=LONG)
    records = {}
    for k, page in pages.items():
        wait_results(page)
        records[k] = download_run(page)
        shot(page, f"two-sessions-{k}")
    eng = get_engine("smollm2-135m-instruct", os.environ.get("ESR_LAB_DEFAULT_SAE"))
    texts = {}
    for k, rec in records.items():
        spec = GenerationSpec.from_dict(rec["spec"])
        assert [f"{iv.latent}:{iv.mode}:{iv.strength:g}:{iv.units}:{iv.positions}" for iv in spec.interventions] == \
            specs[k]["iv"].split(",")
        alone = eng.generate(spec)
        for run in ("steered", "default"):
            assert rec["results"][run]["token_ids"] == alone[run].token_ids, (k, run)
            assert rec["results"][run]["text"] == alone[run].text
        texts[k] = rec["results"]["steered"]["text"]
    assert texts["a"] != texts["b"]
    assert records["a"]["results"]["default"]["text"] == records["b"]["results"]["default"]["text"]
    for p in pages.values():
        p.context.close()


# greedy SmolLM2-135M-Instruct answers this with "Oops, I forget to boil an egg!" (11 tokens): a restart phrase
# at its first token, and the shipped circuit (#1229) fires on " boil" (EMA ~3.96, above the shipped 3.23)
LIVE_PROMPT = "Fill in the blank: Oops, I forgot to ___. Then explain how to boil an egg."

# records every resistance badge that appears in a streaming answer, however briefly it is on the page
BADGE_OBSERVER = """() => {
  window.__esrBadges = {};
  const note = el => {
    const live = el.closest('.esr-live');
    if (!live) return;
    const r = (window.__esrBadges[live.dataset.run] ||= {circuit: [], restart: []});
    const t = +el.dataset.token;
    if (!r[el.dataset.kind].includes(t)) r[el.dataset.kind].push(t);
  };
  const scan = n => {
    if (n.nodeType !== 1) return;
    if (n.matches('.esr-badge')) note(n);
    n.querySelectorAll('.esr-badge').forEach(note);
  };
  new MutationObserver(ms => ms.forEach(m => m.addedNodes.forEach(scan)))
    .observe(document.body, {childList: true, subtree: true});
}"""


def test_live_resistance_circuit_lane_badges_and_restart_marker(server, browser):
    from esr_core.judge.scoring import segment
    from esr_core.latents.groups import LatentGroup
    from esr_core.resistance.live import LiveResistance

    page = browser.new_page()
    page.goto(steering_url(server, p=LIVE_PROMPT, n="24", seed="0", t="0"))
    page.get_by_role("button", name="Generate").wait_for(timeout=LONG)
    page.evaluate(BADGE_OBSERVER)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => document.querySelector('.esr-live')", timeout=LONG)
    wait_results(page)
    page.locator(".js-plotly-plot .legendtext").first.wait_for(timeout=LONG)
    rec = download_run(page)
    groups = {g["name"]: g for g in rec["groups"]}
    assert "resistance circuit" in groups, list(groups)
    circuit = LatentGroup.from_dict(groups["resistance circuit"])

    # (a) the circuit lane is on the timeline
    legend = svg_texts(page, ".js-plotly-plot .legendtext")
    assert "resistance circuit (steered)" in legend and "resistance circuit (default)" in legend, legend

    # what the page should have shown, from the same esr_core computation on the tokens it produced
    seen = page.evaluate("() => window.__esrBadges")
    expected = {}
    for run, res in rec["results"].items():
        tr = LiveResistance.replay(circuit, res["pieces"], res["acts"], res["watch"])
        expected[run] = tr
        got = seen.get(run, {"circuit": [], "restart": []})
        # (b) restart phrases and (c) the circuit crossing, as badges while streaming...
        assert sorted(got["restart"]) == sorted(tr.restart_tokens), (run, got, res["text"])
        assert got["circuit"] == ([tr.crossing] if tr.crossing is not None else []), (run, got, tr.smoothed[:12])
        # ...and kept with the finished run
        box = page.locator(f'.esr-resistance[data-run="{run}"]')
        expect(box).to_have_attribute("data-restarts", ",".join(map(str, tr.restart_tokens)), timeout=LONG)
        expect(box).to_have_attribute("data-crossing", "" if tr.crossing is None else str(tr.crossing))
        assert box.locator(".esr-restart").count() == len(tr.restarts)
        assert box.locator(".esr-circuit").count() == (tr.crossing is not None)
    steered = rec["results"]["steered"]
    assert expected["steered"].restart_tokens, f"no restart phrase in {steered['text']!r}: pick another prompt"
    if expected["steered"].crossing is None:  # the badge's absence was checked, but not its presence
        warnings.warn(f"the circuit stayed under its threshold {expected['steered'].threshold} for this prompt "
                      f"(peak EMA {max(expected['steered'].smoothed, default=0):.3g}): the crossing badge is untested")

    # markers on the timeline: the judge's restart phrases, and the circuit crossing of the steered run
    notes = svg_texts(page, ".js-plotly-plot .annotation-text")
    assert ("restart" in notes) == bool(segment(steered["text"])[1]), notes
    assert ("circuit crossing" in notes) == (expected["steered"].crossing is not None), notes
    page.locator(".esr-resistance").first.scroll_into_view_if_needed()
    shot(page, "live-resistance")
    page.context.close()


def test_experiments_deep_link_opens_in_the_app_frame_with_shipped_results(server, browser):
    """A shared /experiments link shows the shipped runs at once, inside the app (sidebar, navigation)."""
    page = browser.new_page()
    page.goto(server.url + "/experiments")
    page.get_by_text("Rates per condition").first.wait_for(timeout=LONG)
    sidebar = page.locator('[data-testid="stSidebar"]')
    expect(sidebar.get_by_text("Model and SAE")).to_be_visible(timeout=LONG)
    nav = sidebar.inner_text()
    assert "Steering lab" in nav and "Experiments" in nav
    assert "_ui" not in nav and "\nui\n" not in f"\n{nav}\n"  # not Streamlit's file-name navigation
    page.get_by_text("Activity around corrections").first.wait_for(timeout=LONG)
    body = page.inner_text("body")
    # the reference run's headline (steering 0 of 100, meta-prompt 1 %) and the overlay's sources
    assert "restarted in 0.0 % of 100 valid trials" in body and "multi-attempt rate was 1.0 %" in body
    assert "steering on · n = 1" in body
    page.locator(".js-plotly-plot").first.wait_for(timeout=LONG)
    shot(page, "experiments-page")
