"""Every page works, or says clearly why not, on every registry model that is available offline.

Issue #11, item 3: on Gemma the Resistance page crashed (a SmolLM2 latent id as a widget value
beyond Gemma's SAE), the lab drew SmolLM2's circuit lane, and Home offered SmolLM2's examples.
"""

from __future__ import annotations

import pytest
from conftest import warm_app_engine
from streamlit.testing.v1 import AppTest

from esr_core.errors import EsrError
from esr_core.models.loading import check_model
from esr_core.models.registry import list_models
from esr_core.paths import REPO_ROOT

pytestmark = pytest.mark.slow


def _offline_models() -> list[str]:
    out = []
    for e in list_models():
        if e.source not in ("gguf-package", "adapter"):
            continue
        try:
            check_model(e.name)
        except EsrError:
            continue
        out.append(e.name)
    return out


MODELS = _offline_models()
PAGES = {"pages/home.py": "ESR Lab", "pages/latents.py": "Latents", "pages/steering.py": "Steering lab",
         "pages/resistance.py": "Resistance", "pages/experiments.py": "Experiments"}


def open_on(model: str, page: str) -> AppTest:
    warm_app_engine(model)
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=600)
    at.query_params["model"] = model
    at.run()
    at.switch_page(page).run()
    return at


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_opens_on_every_offline_model(model, page):
    at = open_on(model, page)
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state.engine.model.name == model
    assert any(t.value == PAGES[page] for t in at.title), [t.value for t in at.title]
    shown = " ".join(str(getattr(x, "value", "")) for x in list(at.markdown) + list(at.caption) + list(at.info)
                     + list(at.warning))
    own_circuit = model in ("smollm2-135m-instruct", "smollm2-135m-esr")  # the tuned model ships its own
    if page == "pages/resistance.py" and not own_circuit:
        assert "No resistance circuit for this model and SAE" in shown
    if page == "pages/home.py" and not own_circuit:
        assert f"No example is shipped for {model}" in shown
        assert all(b.label != "Open in the steering lab" for b in at.button)
    if model == "smollm2-135m-esr" and page == "pages/home.py":
        assert "No example is shipped" not in shown  # its "watch a recovery" example
        assert any(b.label == "Open in the steering lab" for b in at.button)
    if model == "smollm2-135m-esr" and page in ("pages/steering.py", "pages/latents.py"):
        assert at.session_state.catalog is not None  # the base model's catalog describes its latents


@pytest.mark.skipif("gemma3-270m" not in MODELS, reason="Gemma-3-270m is not installed")
def test_gemma_lab_watches_no_group_found_on_another_sae_and_generates():
    at = open_on("gemma3-270m", "pages/steering.py")
    names = [g.name for g in at.session_state.builtin_groups]
    assert "resistance circuit" not in names and "backtracking" not in names
    assert any("found on another model or SAE" in e for e in at.session_state.group_errors)
    at.number_input(key="w_max_new_tokens").set_value(3)
    at.button(key="generate").click().run()
    assert not at.exception, [e.value for e in at.exception]
    rec = at.session_state.history[-1]
    assert rec.model == "gemma3-270m" and not rec.groups and len(rec.results["steered"].token_ids) == 3


READ_L20 = REPO_ROOT / "assets" / "sae" / "smollm2-135m-instruct-L20"


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_with_the_shipped_block_20_readout_sae(page):
    """#13: steering at block 15 and reading at block 20 (the sidebar's Readout SAE) on every page."""
    from esr_core.app import engine_loader
    from esr_core.app import session as svc
    from esr_core.models.registry import DEFAULT_MODEL

    read = str(READ_L20)
    assert read in svc.readout_sae_folders(576)
    engine_loader.request(DEFAULT_MODEL, svc.default_sae_for(DEFAULT_MODEL), read).join()
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=600).run()
    at.selectbox(key="w_read_sae").select(read).run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    eng = at.session_state.engine
    assert eng.has_readout_sae and eng.read_hook_name == "blocks.20.hook_resid_post"
    errors = at.session_state.group_errors  # two backtracking groups of other SAEs: one note, not two
    assert errors and len(set(errors)) == len(errors), errors
    assert PAGES[page] in " ".join(t.value for t in at.title) or page == "pages/home.py"
    if page == "pages/resistance.py":
        shown = " ".join(m.value for m in at.markdown)
        assert "11 latents" in shown  # the block-20 circuit (searched live), not #1229 of the block-15 SAE
        assert "Live, on the evaluation run" in shown and "3 of 12" in shown and "0 of 12" in shown
        assert any("lives on the readout SAE" in c.value for c in at.caption)
        # the block-24 search (same inputs, its SAE not shipped) is a row of the per-layer table, said so
        layers = next(d.value for d in at.dataframe if "hook" in d.value.columns and "report" in d.value.columns)
        row = layers[layers["hook"] == "blocks.24.hook_resid_post"].iloc[0]
        assert row["size"] == 14 and row["unsteered_crossing"] == pytest.approx(0.0978)
        assert row["sae"].startswith("~/.cache/") and any("--add-layers" in c.value for c in at.caption)
