"""The tuned model's reference run (#12): measured on the base run's plan, shown next to the
base model's numbers with intervals, and its recoveries' lead times on record."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import open_app_page  # noqa: E402

from esr_core.experiments.report import load_summary, models_table  # noqa: E402
from esr_core.experiments.store import REFERENCE_DIR, load_spec  # noqa: E402
from esr_core.paths import ASSETS_DIR  # noqa: E402

TUNED = ASSETS_DIR / "experiments" / "tuned-reference"


def test_the_tuned_run_uses_the_base_runs_plan_and_its_own_detectors():
    base, tuned = load_spec(REFERENCE_DIR), load_spec(TUNED)
    assert tuned.like == "reference" and tuned.model == "smollm2-135m-esr"
    assert tuned.latents == base.latents and tuned.latent_prompts == base.latent_prompts
    assert tuned.boosts == base.boosts  # calibrated once, on the base model
    assert tuned.detector_group.endswith("resistance_circuit.smollm2-135m-esr.json")
    assert len(tuned.random_sets["0"]) == len(tuned.groups["detector_ablation"])
    held = {p for ps in base.latent_prompts.values() for p in ps}
    train = set(json.loads((ASSETS_DIR / "finetune" / "smollm2-135m-esr" / "esr_adapter.json").read_text())
                ["splits"]["train_prompt_ids"])
    assert not held & train


def test_models_table_puts_both_models_side_by_side_with_intervals():
    table = models_table(load_summary(TUNED), load_summary(REFERENCE_DIR))
    row = table.set_index("condition").loc["steering"]
    assert row["ESR · smollm2-135m-instruct"].startswith("0/100")
    assert row["ESR · smollm2-135m-esr"].startswith("4/100") and "[" in row["ESR · smollm2-135m-esr"]
    assert set(table["condition"]) == {"no_steering", "steering", "meta_prompt", "detector_ablation",
                                       "random_ablation"}
    leads = json.loads((TUNED / "leads.json").read_text())
    assert leads["n_recoveries"] == 4 and len(leads["rows"]) == 4


def test_the_experiments_page_shows_the_tuned_run_against_the_base_run():
    at = open_app_page("pages/experiments.py")
    pick = at.selectbox(key="exp_pick")
    pick.select_index(next(i for i, o in enumerate(pick.options) if "tuned-reference" in o)).run()
    assert not at.exception, at.exception
    assert any("Against reference" in s.value for s in at.subheader), [s.value for s in at.subheader]
    assert any("ESR · smollm2-135m-esr" in df.value.columns for df in at.dataframe)


def test_lead_summary_counts_who_came_first():
    from esr_core.experiments.mechanism import lead_summary

    rows = [{"first_crossing": 1, "first_restart": 19, "lead_tokens": 18},
            {"first_crossing": 106, "first_restart": 89, "lead_tokens": -17},
            {"first_crossing": None, "first_restart": 5, "lead_tokens": None}]
    s = lead_summary(rows)
    assert s == {"n_with_crossing_and_restart": 2, "n_without_crossing": 1, "crossing_first_share": 0.5,
                 "median_lead_tokens": 0.5}
    shipped = json.loads((TUNED / "leads.json").read_text())
    again = lead_summary(shipped["rows"])
    assert again["crossing_first_share"] == shipped["crossing_first_share"] == 0.75
    assert again["median_lead_tokens"] == shipped["median_lead_tokens"] == 32.5
