"""The app's pages under streamlit.testing.v1.AppTest, on the real default model and SAE.

AppTest cannot drive plotly events or file uploads: those are thin over pure functions
(tests/test_rendering.py) and covered in a real browser (tests/test_browser.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SAE = REPO / "assets" / "sae" / "smollm2-135m-instruct"
APP = str(REPO / "app.py")
TIMEOUT = 600

pytestmark = pytest.mark.slow

if not (DEFAULT_SAE / "cfg.json").exists() and not os.environ.get("ESR_LAB_DEFAULT_SAE"):
    pytest.skip(f"the default SAE is not in {DEFAULT_SAE} yet (trained by esr-lab sae train)",
                allow_module_level=True)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from conftest import warm_app_engine  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

# a latent far from a boiling-egg prompt and a strength that changes the answer
EXAMPLE = json.loads((REPO / "assets" / "examples.json").read_text())["examples"][0]


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def exceptions(at) -> list[str]:
    return [x.value for x in at.exception]


def fresh(page: str | None = None) -> AppTest:
    warm_app_engine()
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not exceptions(at), exceptions(at)
    if page:
        at.switch_page(page).run()
        assert not exceptions(at), exceptions(at)
    return at


def steering(prompt: str = "How do I boil an egg?", n: int = 8) -> AppTest:
    at = fresh("pages/steering.py")
    at.text_area(key="w_prompt").input(prompt)
    at.number_input(key="w_max_new_tokens").set_value(n)
    return at.run()


def add_iv(at, latent, strength, mode="add") -> AppTest:
    at.text_input(key="iv_latent").input(str(latent))
    at.selectbox(key="iv_mode").select(mode)
    at.text_input(key="iv_strength").input(str(strength))
    at.button(key="add_iv").click()
    return at.run()


def test_home_loads_on_the_default_model():
    at = fresh()
    assert not errors(at), errors(at)
    assert at.title[0].value == "ESR Lab"
    side = " ".join(m.value for m in at.sidebar.markdown)
    assert "smollm2-135m-instruct" in side and "d_sae" in side
    assert at.session_state.engine.sae.source.endswith(os.environ.get("ESR_LAB_DEFAULT_SAE", str(DEFAULT_SAE)))
    body = " ".join(m.value for m in at.markdown)
    for number in ("3.8 %", "7.4 %", "< 1 %", "0 %", "4.3x", "26 detector latents"):
        assert number in body, number


def test_example_button_opens_the_steering_lab_and_generates(tmp_path, monkeypatch):
    from esr_core.app import session as app_services

    short = dict(EXAMPLE, max_new_tokens=6)  # keep it short (the shipped example asks for more)
    (tmp_path / "examples.json").write_text(json.dumps({"examples": [short]}))
    monkeypatch.setattr(app_services, "EXAMPLES_FILE", tmp_path / "examples.json")
    at = fresh()
    at.button(key="example_0").click().run()
    assert not exceptions(at), exceptions(at)
    assert at.session_state.ivs[0]["latent"] == EXAMPLE["latent"]
    rec = at.session_state.history[-1]  # the example starts a generation at once
    assert len(rec.results["steered"].token_ids) == 6
    assert rec.results["steered"].text != rec.results["default"].text


def test_search_returns_results():
    at = fresh("pages/latents.py")
    cat = at.session_state.catalog
    if cat is not None:
        query = next(d for d in cat.descriptions() if d and d != "no description").split()[0]
    else:
        query = "12 40"
    at.text_input(key="w_query").input(query).run()
    assert not errors(at), errors(at)
    result_buttons = [b for b in at.button if str(b.key).startswith("res_")]
    assert result_buttons, f"no results for {query!r}"
    result_buttons[0].click().run()
    assert at.subheader and at.subheader[0].value.startswith("Latent #")


def test_latent_detail_test_your_text_and_nearest():
    at = fresh("pages/latents.py")
    at.text_input(key="open_id").input("7").run()
    assert at.subheader[0].value == "Latent #7"
    at.text_input(key="test_text").input("The cat sat on the mat.").run()
    assert not errors(at), errors(at)
    assert any("Max on your text" in c.value for c in at.caption)
    nb = [b for b in at.button if str(b.key).startswith("nb_")]
    assert nb
    nb[0].click().run()
    assert at.subheader[0].value != "Latent #7"


def test_generation_with_an_intervention_gives_two_different_answers_and_replays():
    at = steering()
    at = add_iv(at, EXAMPLE["latent"], EXAMPLE["strength"])
    assert not errors(at), errors(at)
    at.button(key="generate").click().run()
    assert not errors(at) and not exceptions(at), (errors(at), exceptions(at))
    rec = at.session_state.history[-1]
    st_text, df_text = rec.results["steered"].text, rec.results["default"].text
    assert st_text and df_text and st_text != df_text
    assert len(rec.results["steered"].token_ids) == 8
    assert EXAMPLE["latent"] in rec.spec.watch

    # the resistance layer: the shipped circuit is watched by default and each answer gets a verdict
    import json as _json

    from esr_core.paths import ASSETS_DIR

    circuit = _json.loads((ASSETS_DIR / "groups" / "resistance_circuit.json").read_text())
    assert set(circuit["members"]) <= set(rec.spec.watch)
    judged = at.session_state["_judged"][rec.id]
    assert judged["steered"]["verdict"] in ("single", "multi", "esr")
    assert judged["steered"]["regions"] and judged["steered"]["regions"][0][0] == 0
    assert any("Verdict (steered run)" in m.value for m in at.markdown)

    # history round-trips through JSON, and the same spec + seed gives the same text
    from esr_core.app.run_record import RunRecord

    back = RunRecord.from_json(rec.to_json())
    assert back.results["steered"].text == st_text and back.spec.to_dict() == rec.spec.to_dict()
    at.text_area(key="run_paste").input(rec.to_json())
    at.button(key="run_paste_open").click().run()
    assert not errors(at), errors(at)
    assert len(at.session_state.history) == 2
    at.button(key="reload_spec").click().run()
    at.button(key="generate").click().run()
    again = at.session_state.history[-1]
    assert again.id != rec.id
    assert again.results["steered"].text == st_text and again.results["default"].text == df_text


@pytest.mark.parametrize("latent,strength,expect", [
    ("12", "1e9", "absurd"),
    ("12", "nan", "finite"),
    ("99999", "4", "out of range"),
    ("abc", "4", "not a latent id"),
])
def test_bad_intervention_input_shows_an_error(latent, strength, expect):
    at = steering()
    at = add_iv(at, latent, strength)
    assert any(expect in e for e in errors(at)), errors(at)
    assert not exceptions(at)
    assert at.session_state.ivs == []
    assert at.button(key="generate")  # page still alive


def test_empty_prompt_and_invalid_json_show_errors_and_keep_the_page():
    at = steering(prompt="   ")
    at.button(key="generate").click().run()
    assert any("prompt is empty" in e for e in errors(at)), errors(at)
    assert not at.session_state.history
    at.text_area(key="run_paste").input("{not json")
    at.button(key="run_paste_open").click().run()
    assert any("not valid JSON" in e for e in errors(at)), errors(at)
    at.text_area(key="run_paste").input(json.dumps({"format": "something else"}))
    at.button(key="run_paste_open").click().run()
    assert any("not an ESR Lab run record" in e for e in errors(at)), errors(at)
    assert not exceptions(at)
    at.text_input(key="w_watch_text").input("5, 999999").run()
    assert any("out of range" in e for e in errors(at)), errors(at)
    assert at.button(key="generate")


def test_url_state_restores_prompt_interventions_and_groups():
    warm_app_engine()
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update({"p": "Tell me about tea", "iv": "12:add:5:norm:all", "w": "3,4", "seed": "7",
                            "g": "mine~009E73~3_4*0.5"})
    at.run()
    at.switch_page("pages/steering.py").run()
    assert not exceptions(at)
    ss = at.session_state
    assert ss.prompt == "Tell me about tea" and ss.ivs[0]["latent"] == 12 and ss.seed == 7
    assert ss.watch == [3, 4] and ss.user_groups[0].members == [3, 4]
    assert at.text_area(key="w_prompt").value == "Tell me about tea"


def test_groups_create_and_watch_lane():
    at = steering(n=6)
    at.text_input(key="grp_name").input("pair")
    at.text_input(key="grp_ids").input("3, 4:0.5")
    at.button(key="grp_create").click().run()
    assert not errors(at), errors(at)
    # the new group is watched, next to the shipped resistance groups that are watched by default
    assert at.session_state.sel_groups[-1] == "pair"
    assert {"resistance circuit", "backtracking"} <= set(at.session_state.sel_groups)
    at.text_input(key="grp_ids").input("3, 99999")
    at.button(key="grp_create").click().run()
    assert any("beyond" in e for e in errors(at)), errors(at)
