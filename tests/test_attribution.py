"""Restart attribution on the resistance-tuned model (#13): gradients, ablation, the shipped report.

Real model and real restarts (the tuned-reference run's). The gradient is checked against a
finite difference of the restart token's log-probability, and ablating the top attributed
latents must lower it more than ablating as many random active latents.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from esr_core.errors import BadInput
from esr_core.experiments.attribution import (
    ATTRIBUTION_FILE,
    AttributionParams,
    ablated_logp,
    attribute_case,
    attribution_caption,
    attribution_reports,
    restart_cases,
    run_attribution,
)
from esr_core.paths import ASSETS_DIR

pytestmark = pytest.mark.slow

RUN = ASSETS_DIR / "experiments" / "tuned-reference"


@pytest.fixture(scope="module")
def tuned():
    from esr_core.steering.engines import get_engine

    return get_engine("smollm2-135m-esr", None)


def test_restart_cases_locate_the_restart_inside_the_response():
    cases = restart_cases(RUN, ("steering",), limit=3)
    assert len(cases) == 3
    for c in cases:
        assert 8 <= c["restart_char"] < len(c["response"])
        assert any(iv.mode == "add" for iv in c["interventions"])


def test_attribution_is_a_first_order_estimate_of_ablation(tuned):
    """Ablating one latent on the tokens before the restart changes log p by about -attribution."""
    case = restart_cases(RUN, ("steering",), limit=1)[0]
    res = attribute_case(tuned, tuned.sae, case)
    top = int(np.argmax(res["attribution"]))
    assert res["attribution"][top] > 0
    base = ablated_logp(tuned, tuned.sae, case, res, [])
    assert base == pytest.approx(res["logp"], abs=1e-4)  # the SAE splice with its frozen error is exact
    drop = res["logp"] - ablated_logp(tuned, tuned.sae, case, res, [top])
    assert drop > 0 and drop == pytest.approx(res["attribution"][top], rel=0.9)


def test_top_latents_lower_the_restart_more_than_random_ones(tuned):
    rep = run_attribution(tuned, RUN, params=AttributionParams(conditions=("steering",), limit=3, top_k=5,
                                                                random_draws=2), detectors=[1229])
    assert rep["n_restarts"] == 3 and len(rep["top"]) == 5
    assert rep["mean_delta_logp_top"] < rep["mean_delta_logp_random"]
    assert "Ablating them" in attribution_caption(rep)


def test_no_restart_in_the_chosen_conditions_is_one_clear_error(tuned):
    with pytest.raises(BadInput, match="no trial with a restart phrase"):
        run_attribution(tuned, RUN, params=AttributionParams(conditions=("no_such_condition",)))


def test_the_shipped_attribution_reports_cover_every_restart_at_both_layers():
    reps = attribution_reports(RUN)
    assert [r["read_hook"] for r in reps] == ["blocks.15.hook_resid_post", "blocks.20.hook_resid_post"]
    n_cases = len(restart_cases(RUN, ("steering", "meta_prompt")))
    for rep in reps:
        assert rep["n_restarts"] == n_cases == len(rep["rows"]) and len(rep["top"]) == 10
        assert rep["mean_delta_logp_top"] < rep["mean_delta_logp_random"]  # causal: the top set matters more
        assert rep["share_top_lowers_more"] > 0.5 and rep["command"].startswith("esr-lab detectors attribute")
    assert "--read-sae" in reps[1]["command"] and reps[1]["steer_hook"] == "blocks.15.hook_resid_post"


def test_attribution_reports_list_the_steering_layer_first_and_say_what_is_unreadable(tmp_path):
    (tmp_path / "attribution.blocks.20.hook_resid_post.json").write_text(json.dumps({"read_hook": "b20"}))
    (tmp_path / ATTRIBUTION_FILE).write_text(json.dumps({"read_hook": "b15"}))
    (tmp_path / "attribution.broken.json").write_text("{not json")
    reps = attribution_reports(tmp_path)
    assert [r.get("read_hook") for r in reps] == ["b15", "b20", None]
    assert "attribution.broken.json" in reps[2]["error"] and "not valid JSON" in reps[2]["error"]


def test_the_cli_attributes_to_a_readout_sae_and_times_the_circuit_against_the_restart(tmp_path, capsys):
    """Steering at block 15, attributing to block 20: the report is named after the readout hook
    (the steering layer's stays), compares with the readout's own circuit and says when it alerts."""
    import shutil

    from esr_core.cli import main
    from esr_core.paths import REPO_ROOT

    run = tmp_path / "run"
    run.mkdir()
    for f in ("spec.json", "trials.parquet"):
        shutil.copy(RUN / f, run / f)
    l20 = str(REPO_ROOT / "assets" / "sae" / "smollm2-135m-instruct-L20")
    circuit = str(ASSETS_DIR / "groups" / "resistance_circuit.smollm2-135m-esr-L20.json")
    assert main(["detectors", "attribute", "--model", "smollm2-135m-esr", "--read-sae", l20, "--run", str(run),
                 "--limit", "2", "--top-k", "3", "--random-draws", "1", "--compare-group", circuit, "--json"]) == 0
    rep = json.loads((run / "attribution.blocks.20.hook_resid_post.json").read_text())
    assert not (run / ATTRIBUTION_FILE).exists()
    assert rep["read_hook"] == "blocks.20.hook_resid_post" and rep["n_restarts"] == 2
    members = json.loads(open(circuit).read())["members"]
    assert rep["detectors"] == sorted(members)  # the readout SAE's circuit, not the steering layer's
    assert list(rep["overlap_with_groups"]) == [circuit]
    assert 0 <= rep["detector_alert_share"] <= 1 and len(rep["rows"]) == 2
    for row in rep["rows"]:
        lead = row["detector_alert_lead"]
        assert lead is None or 1 <= lead <= row["restart_token"]
    assert "The circuit alerts before" in attribution_caption(rep)
