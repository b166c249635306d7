"""Metrics against hand-computed cases (ESR_METHOD.md sec. 2)."""

import math

import numpy as np
import pandas as pd
import pytest

from esr_core.errors import BadInput
from esr_core.experiments import stats as ex_stats
from esr_core.experiments.metrics import (
    SUMMARY_COLUMNS,
    compare_to_baseline,
    degraded_output,
    relative_change,
    summarise,
    trial_flags,
    wilson_interval,
)

# --- degraded flag -----------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("the the the the the", True),
    ("The, the. THE! the? the", True),               # case and punctuation ignored
    ("the the the the", False),                     # only four
    ("a a a a a a a a", False),                     # one-letter words never count
    ("go go go go a go", False),                    # a short word breaks the run
    ("word word — word word word", True),           # pure punctuation tokens are skipped
    ("How do you bake bread? Mix flour and water.", False),
    ("", False),
    (None, False),
])
def test_degraded_output(text, expected):
    assert degraded_output(text) is expected


# --- trial flags -------------------------------------------------------------

def test_trial_flags_multi_improved():
    f = trial_flags({"attempts": [{"attempt_text": "a", "score": 20}, {"attempt_text": "b", "score": 75}]})
    assert f == {"valid": True, "n_attempts": 2, "multi_attempt": True, "improved": True,
                 "first_score": 20.0, "last_score": 75.0, "delta": 55.0}


def test_trial_flags_equal_scores_not_improved_and_single_has_no_delta():
    f = trial_flags({"attempts": [{"score": 40}, {"score": 10}, {"score": 40}]})
    assert f["multi_attempt"] and not f["improved"] and f["delta"] == 0.0
    single = trial_flags([{"score": 80}])
    assert single["valid"] and not single["multi_attempt"] and math.isnan(single["delta"])


def test_trial_flags_invalid_cases():
    assert trial_flags({"attempts": []})["valid"] is False
    assert trial_flags({"attempts": []})["n_attempts"] == 0
    assert trial_flags(None)["n_attempts"] is None
    # attempts without a numeric score do not count
    f = trial_flags({"attempts": [{"attempt_text": "x", "score": None}, {"score": "70"}]})
    assert f["n_attempts"] == 1 and f["first_score"] == 70.0


# --- intervals ---------------------------------------------------------------

def test_wilson_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0


def test_wilson_empty_and_bad():
    lo, hi = wilson_interval(0, 0)
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(BadInput):
        wilson_interval(3, 2)


def test_fallback_special_functions_match_scipy(monkeypatch):
    from scipy import special, stats

    for a, b, x in [(0.5, 5.5, 0.3), (2.0, 3.0, 0.7), (3.5, 2.0, 0.3), (0.5, 0.5, 0.99)]:
        assert ex_stats.betainc_fallback(a, b, x) == pytest.approx(special.betainc(a, b, x), abs=1e-10)
    for df in (1, 4, 30):
        assert ex_stats.t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-6)
    assert ex_stats.t_quantile(0.025, 4) == pytest.approx(-2.7764451, rel=1e-6)


# --- summarise ---------------------------------------------------------------

def _att(*scores):
    return [{"attempt_text": f"attempt {i}", "score": s} for i, s in enumerate(scores)]


def hand_table():
    rows = [
        ("steering", _att(50), False, None),
        ("steering", _att(20, 80), False, None),          # improved
        ("steering", _att(60, 40), False, None),          # multi, worse
        ("steering", _att(30, 30, 30), False, None),      # multi, equal: not improved
        ("steering", [], False, None),                    # no attempts
        ("steering", None, False, "judge timed out"),     # error
        ("steering", None, False, None),                  # not judged
        ("steering", _att(10, 90), True, None),           # improved but degraded
        ("meta_prompt", _att(70), False, None),
        ("meta_prompt", _att(80), False, None),
    ]
    return pd.DataFrame([{"prompt_id": i, "condition": c, "attempts": a, "degraded": d,
                          "error": e, "seed": i} for i, (c, a, d, e) in enumerate(rows)])


def test_summarise_hand_computed():
    s = summarise(hand_table()).set_index("condition")
    assert list(s.reset_index().columns) == ["condition"] + list(SUMMARY_COLUMNS)
    st = s.loc["steering"]
    assert (st.n_trials, st.n_valid, st.n_dropped) == (8, 5, 3)
    assert (st.n_dropped_error, st.n_dropped_not_judged, st.n_dropped_no_attempts,
            st.n_dropped_degraded, st.n_degraded) == (1, 1, 1, 0, 1)
    assert (st.multi_attempt_k, st.multi_attempt_n) == (4, 5)
    assert (st.esr_k, st.esr_n, st.esr_rate) == (2, 5, 0.4)
    assert (st.improvement_k, st.improvement_n, st.improvement_rate) == (2, 4, 0.5)
    assert st.score_improvement_mean == pytest.approx((60 - 20 + 0 + 80) / 4)
    assert st.score_improvement_n == 4
    # first scores 50, 20, 60, 30, 10: mean 34, t interval with t(0.975, 4)
    sd = np.std([50, 20, 60, 30, 10], ddof=1)
    assert st.first_score_mean == pytest.approx(34.0)
    assert st.first_score_hi - st.first_score_mean == pytest.approx(2.7764451 * sd / math.sqrt(5), rel=1e-6)
    assert (st.esr_lo, st.esr_hi) == pytest.approx(wilson_interval(2, 5))
    mp = s.loc["meta_prompt"]
    assert (mp.n_valid, mp.multi_attempt_k, mp.esr_rate) == (2, 0, 0.0)
    assert mp.multi_attempt_lo == 0.0 and mp.multi_attempt_hi == pytest.approx(0.6576, abs=1e-3)
    assert mp.improvement_n == 0 and math.isnan(mp.improvement_rate) and math.isnan(mp.improvement_hi)
    assert mp.score_improvement_n == 0 and math.isnan(mp.score_improvement_mean)


def test_summarise_drop_degraded():
    st = summarise(hand_table(), drop_degraded=True).set_index("condition").loc["steering"]
    assert (st.n_valid, st.n_dropped, st.n_dropped_degraded, st.n_degraded) == (4, 4, 1, 1)
    assert (st.multi_attempt_k, st.multi_attempt_n, st.esr_k, st.improvement_n) == (3, 4, 1, 3)
    assert st.score_improvement_mean == pytest.approx(40 / 3)


def test_summarise_without_attempts_column_uses_score_columns():
    df = pd.DataFrame({"condition": ["x"] * 3, "n_attempts": [1, 3, 0],
                       "first_score": [50, 20, np.nan], "last_score": [50, 70, np.nan],
                       "error": [None, None, None]})
    s = summarise(df).iloc[0]
    assert (s.n_valid, s.multi_attempt_k, s.esr_k, s.n_dropped_no_attempts) == (2, 1, 1, 1)


def test_summarise_degraded_from_response_and_overall_and_empty():
    df = pd.DataFrame({"attempts": [_att(10), _att(20)],
                       "response": ["fine answer here", "cat cat cat cat cat"]})
    s = summarise(df, by=None)
    assert len(s) == 1 and s.iloc[0].n_degraded == 1
    empty = summarise(pd.DataFrame(), by=("condition", "boost_norm"))
    assert empty.empty and list(empty.columns) == ["condition", "boost_norm"] + list(SUMMARY_COLUMNS)


def test_summarise_by_two_keys():
    df = hand_table()
    df["boost_norm"] = [1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0]
    s = summarise(df, by=("condition", "boost_norm"))
    assert len(s) == 3
    row = s[(s.condition == "steering") & (s.boost_norm == 1.0)].iloc[0]
    assert (row.n_valid, row.esr_k) == (2, 1)


# --- comparisons -------------------------------------------------------------

def test_relative_change_paper_numbers():
    assert relative_change(0.055, 0.074) == pytest.approx(-0.2568, abs=1e-4)
    assert relative_change(0.317, 0.074) + 1 == pytest.approx(4.28, abs=0.01)
    assert math.isnan(relative_change(0.1, 0.0))
    assert math.isnan(relative_change(float("nan"), 0.1))


def test_compare_to_baseline():
    c = compare_to_baseline(summarise(hand_table()), baseline="steering")
    assert set(c.condition) == {"meta_prompt"}
    r = c[c.metric == "multi_attempt"].iloc[0]
    assert (r.k, r.n, r.baseline_k, r.baseline_n) == (0, 2, 4, 5)
    assert r.ratio == 0.0 and r.relative_change == -1.0 and r["diff"] == pytest.approx(-0.8)
    assert r.diff_lo < r["diff"] < r.diff_hi
    with pytest.raises(BadInput):
        compare_to_baseline(summarise(hand_table()), baseline="nope")


def test_summarise_same_after_parquet_round_trip(tmp_path):
    """The runner stores trials as parquet: list columns come back as numpy arrays."""
    df = hand_table()
    df.to_parquet(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(summarise(df), summarise(pd.read_parquet(tmp_path / "t.parquet")))
