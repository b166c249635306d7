"""Single trials (#11, items 13-14): the headline says what the few ESR cases are, any trial reruns
in the steering lab with its prompt, steering, meta-prompt and seed, the lab has the meta-prompt
toggle, and the Resistance page's conditions get the lab's heatmap and timeline."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import open_app_page  # noqa: E402

from esr_core.experiments.cases import cases_sentence, describe_case, esr_cases, lab_setup  # noqa: E402
from esr_core.experiments.conditions import META_PROMPTS  # noqa: E402
from esr_core.experiments.metrics import trial_table_flags  # noqa: E402
from esr_core.experiments.store import REFERENCE_DIR, load_spec, load_trials  # noqa: E402
from esr_core.steering.spec import GenerationSpec  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    return load_spec(REFERENCE_DIR), trial_table_flags(load_trials(REFERENCE_DIR))


def _row(**kw):
    base = {"condition": "steering", "latent": 7, "latent_label": "cats", "prompt": "How do I boil an egg?",
            "first_score": 10.0, "last_score": 80.0, "valid": True, "multi_attempt": True, "improved": True,
            "attempts": json.dumps([{"attempt_text": "Cats purr.", "score": 10},
                                    {"attempt_text": "Wait, let me refocus. Boil water first.", "score": 80}])}
    base.update(kw)
    return base


def test_reference_headline_says_its_only_esr_case_is_a_restart_that_drifts_again(reference):
    _, trials = reference
    assert len(esr_cases(trials)) == 1
    headline = json.loads((REFERENCE_DIR / "summary.json").read_text())["headline"]
    assert "The only ESR trial" in headline and "“Let me start from scratch.”" in headline
    assert "0 → 3.6 of 100" in headline and "drifts again" in headline


def test_a_real_recovery_is_called_one_and_many_cases_are_not_listed():
    assert "a real recovery" in describe_case(_row())
    assert "“Wait, let me refocus.”" in describe_case(_row())
    drift = describe_case(_row(last_score=20.0))
    assert "still off-task" in drift and "real recovery" not in drift
    many = pd.DataFrame([_row(latent=i) for i in range(5)])
    assert cases_sentence(many) == ""
    assert cases_sentence(pd.DataFrame([_row(), _row(latent=8)])).startswith("The 2 ESR trials: (1)")
    assert cases_sentence(pd.DataFrame([_row(improved=False)])) == ""


def test_lab_setup_of_a_trial_has_its_prompt_meta_prompt_steering_and_seed(reference):
    spec, trials = reference
    case = esr_cases(trials).iloc[0].to_dict()
    s = lab_setup(spec, case)
    assert s["prompt"] == case["prompt"] and s["meta_prompt"] == META_PROMPTS["get_back_on_track"]
    assert s["seed"] == case["seed"] and s["temperature"] == spec.temperature
    assert s["interventions"] == [{"latent": case["latent"], "mode": "add", "strength": case["boost"], "units": "raw",
                                   "positions": "all"}]
    abl = trials[trials["condition"] == "detector_ablation"].iloc[0].to_dict()
    s2 = lab_setup(spec, abl)
    ablated = [iv["latent"] for iv in s2["interventions"] if iv["mode"] == "ablate"]
    assert s2["meta_prompt"] is None and len(ablated) == len(spec.groups["detector_ablation"])
    unsteered = lab_setup(spec, trials[trials["condition"] == "no_steering"].iloc[0].to_dict())
    assert unsteered["interventions"] == []


def test_spec_meta_prompt_is_sent_but_not_part_of_the_prompt():
    s = GenerationSpec(prompt="How do I boil an egg? ", meta_prompt="  Stay on topic. ").validate()
    assert s.prompt.strip() == "How do I boil an egg?" and s.meta_prompt == "Stay on topic."
    assert s.sent_prompt() == "How do I boil an egg? Stay on topic."
    assert GenerationSpec.from_dict(s.to_dict()).meta_prompt == "Stay on topic."
    assert GenerationSpec(prompt="x").validate().sent_prompt() == "x"


def test_the_esr_trial_opens_in_the_lab_and_reproduces_its_text(reference):
    spec, trials = reference
    case = esr_cases(trials).iloc[0]
    at = open_app_page("pages/experiments.py")
    assert not at.exception, at.exception
    at.button(key="open_case_0_reference").click().run()
    assert not at.exception, at.exception
    ss = at.session_state
    rec = ss.history[-1]  # the lab opened and ran the trial at once
    assert rec.spec.prompt == case["prompt"] and rec.spec.seed == int(case["seed"])
    assert rec.spec.meta_prompt == META_PROMPTS["get_back_on_track"]
    assert rec.spec.interventions[0].latent == int(case["latent"]) and rec.spec.interventions[0].units == "raw"
    assert ss.meta_on is True and "reference" in ss.lab_source
    assert rec.results["steered"].text == case["response"]  # same set-up, same text
    assert "meta-prompt" in rec.label


def test_lab_meta_prompt_toggle_sends_it_and_judges_without_it():
    at = open_app_page("pages/steering.py")
    at.text_area(key="w_prompt").input("How do I boil an egg?").run()
    at.number_input(key="w_max_new_tokens").set_value(8).run()
    at.checkbox(key="w_meta_on").check().run()
    at.selectbox(key="w_meta_variant").select("dont_get_distracted").run()
    assert any("Don't get distracted!" in c.value for c in at.caption)
    at.button(key="generate").click().run()
    assert not at.exception, at.exception
    rec = at.session_state.history[-1]
    assert rec.spec.prompt == "How do I boil an egg?" and rec.spec.meta_prompt == "Don't get distracted!"
    assert "How do I boil an egg? Don't get distracted!" in rec.rendered_prompt


def test_resistance_conditions_get_the_heatmap_and_timeline_and_open_in_the_lab():
    at = open_app_page("pages/resistance.py")
    at.number_input(key="res_ntok").set_value(8).run()
    at.button(key="cond_steering").click().run()
    at.button(key="cond_meta_prompt").click().run()
    assert not at.exception, at.exception
    html = " ".join(h.proto.body for h in at.get("html"))
    assert html.count('class="esr-heatmap"') >= 2
    charts = [c for c in at.get("plotly_chart")]
    assert len(charts) >= 2
    store = at.session_state.res_conditions
    assert store["meta_prompt"]["rec"].spec.meta_prompt and not store["steering"]["rec"].spec.meta_prompt
    at.button(key="cond_lab_meta_prompt").click().run()
    assert not at.exception, at.exception
    rec = at.session_state.history[-1]
    assert rec.spec.meta_prompt == store["meta_prompt"]["rec"].spec.meta_prompt
    assert rec.results["steered"].text == store["meta_prompt"]["rec"].results["steered"].text
