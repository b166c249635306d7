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


def test_the_shipped_attribution_report_is_complete():
    rep = json.loads((RUN / ATTRIBUTION_FILE).read_text())
    assert rep["n_restarts"] >= 10 and rep["top"] and rep["rows"]
    assert rep["mean_delta_logp_top"] is not None and rep["mean_delta_logp_random"] is not None
    assert "command" in rep
