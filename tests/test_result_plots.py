"""Result figures build from small and empty tables and contain the expected traces."""


import numpy as np
import pandas as pd
import pytest

from esr_core.errors import EsrError
from esr_core.experiments.metrics import pool_by, summarise, trial_table_flags
from esr_core.experiments.overlay_summary import align_at_events
from esr_core.experiments.paper import PAPER_NUMBERS, comparison_table, paper_table
from esr_core.viz import result_plots as rp


def _att(*scores):
    return [{"attempt_text": f"a{i}", "score": s} for i, s in enumerate(scores)]


@pytest.fixture
def trials():
    rows = []
    specs = {"steering": [_att(50), _att(20, 80), _att(60, 40), _att(70)],
             "meta_prompt": [_att(10, 90), _att(30, 50), _att(40)]}
    for cond, atts in specs.items():
        for i, a in enumerate(atts):
            for b in (-1.0, 0.0):
                rows.append({"prompt_id": i, "condition": cond, "attempts": a, "seed": i,
                             "boost_sd": b, "boost_norm": 2 + b, "degraded": False, "error": None})
    return pd.DataFrame(rows)


def _names(fig):
    return [t.name for t in fig.data]


def _is_empty_fig(fig):
    return len(fig.data) == 0 and len(fig.layout.annotations) == 1


def test_score_delta_figure(trials):
    fig = rp.score_delta_figure(trial_table_flags(trials), summarise(trials))
    names = _names(fig)
    assert "Δ score · steering" in names and "Δ score · meta_prompt" in names
    assert "Multi-attempt rate" in names and "ESR rate" in names
    hist = next(t for t in fig.data if t.name == "Δ score · steering")
    assert sorted(hist.x) == [-20, -20, 60, 60]
    bars = next(t for t in fig.data if t.name == "ESR rate")
    assert list(bars.x) == ["meta_prompt", "steering"]
    assert list(bars.y) == pytest.approx([4 / 6, 2 / 8])
    assert "k/n = 2/8" in bars.hovertext[1]
    assert _is_empty_fig(rp.score_delta_figure(pd.DataFrame(), pd.DataFrame()))


def test_rates_vs_boost(trials):
    s = summarise(trials, by=("condition", "boost_sd"))
    fig = rp.rates_vs_boost_figure(s, x="boost_sd")
    names = _names(fig)
    assert "ESR rate · steering" in names and "Improvement rate · meta_prompt" in names
    t = next(t for t in fig.data if t.name == "Multi-attempt rate · steering")
    assert list(t.x) == [-1.0, 0.0] and list(t.y) == pytest.approx([0.5, 0.5])
    one = rp.rates_vs_boost_figure(summarise(trials[trials.condition == "steering"],
                                             by=("condition", "boost_norm")), x="boost_norm")
    assert set(_names(one)) == {"Multi-attempt rate", "ESR rate", "Improvement rate", "Mean first-attempt score"}
    # the score panel shows the mean first-attempt score per boost level, on its own 0-100 axis
    sc = next(t for t in one.data if t.name == "Mean first-attempt score")
    part = summarise(trials[trials.condition == "steering"], by=("condition", "boost_norm")).sort_values("boost_norm")
    assert list(sc.y) == pytest.approx(part["first_score_mean"].astype(float).tolist())
    assert sc.yaxis == "y3" and tuple(one.layout.yaxis3.range) == (0, 100)
    assert _is_empty_fig(rp.rates_vs_boost_figure(summarise(pd.DataFrame(), by=("boost_sd",))))
    assert _is_empty_fig(rp.rates_vs_boost_figure(s, x="no_such_column"))


def test_condition_comparison(trials):
    s = summarise(trials, by=("condition", "boost_sd"))
    fig = rp.condition_comparison_figure(pool_by(s), baseline="steering")  # pooled over boosts
    bars = [t for t in fig.data if t.type == "bar"]
    assert [b.name for b in bars] == ["Multi-attempt rate", "ESR rate", "Improvement rate"]
    assert list(bars[0].y) == pytest.approx([4 / 6, 4 / 8])
    base = [t for t in fig.data if t.name == "baseline (steering)"]
    assert len(base) == 3 and list(base[1].y) == pytest.approx([0.25, 0.25])
    assert all(l.dash == "dash" for l in (b.line for b in base))
    assert _is_empty_fig(rp.condition_comparison_figure(pd.DataFrame()))
    assert _is_empty_fig(rp.condition_comparison_figure(s))  # not pooled: one row per condition is required


def test_first_last_scatter(trials):
    fig = rp.first_last_scatter(trial_table_flags(trials))
    assert _names(fig) == ["meta_prompt (n=4)", "steering (n=4)", "y = x (no change)"]
    st = fig.data[1]
    assert sorted(zip(st.x, st.y)) == [(20, 80), (20, 80), (60, 40), (60, 40)]
    empty = rp.first_last_scatter(pd.DataFrame())
    assert _is_empty_fig(empty)
    no_multi = rp.first_last_scatter(trial_table_flags(trials[trials.attempts.map(len) == 1]))
    assert _names(no_multi) == ["y = x (no change)"] and len(no_multi.layout.annotations) == 1


def test_align_at_events_pads_with_nan():
    offsets, mat = align_at_events([[1, 2, 3, 4], [10, 20]], [2, 0], before=2, after=1)
    assert list(offsets) == [-2, -1, 0, 1]
    assert mat[0].tolist() == [1, 2, 3, 4]
    assert np.isnan(mat[1, :2]).all() and mat[1, 2:].tolist() == [10, 20]
    _, mat = align_at_events([[1, 2]], [5], 1, 1)  # correction outside the episode: dropped
    assert np.isnan(mat).all()
    with pytest.raises(EsrError):
        align_at_events([[1]], [0, 1])


def test_export_html_always_and_png_error_when_kaleido_missing(tmp_path, monkeypatch):
    fig = rp.first_last_scatter(pd.DataFrame())
    written = rp.export_figure(fig, tmp_path / "fig.html", png=False)
    assert written == [tmp_path / "fig.html"]
    html = written[0].read_text()
    assert "<script" in html and "src=\"https://cdn" not in html and len(html) > 1_000_000  # plotly.js embedded
    monkeypatch.setattr(rp, "kaleido_available", lambda: False)
    with pytest.raises(EsrError, match="kaleido"):
        rp.export_figure(fig, tmp_path / "fig2", png=True)
    assert (tmp_path / "fig2.html").exists()


def test_paper_numbers_and_comparison(trials):
    t = paper_table()
    row = t[(t.condition == "steering") & (t.quantity == "esr_rate") & (t.params_b == 70.6)].iloc[0]
    assert (row.value, row.n) == (0.038, 4877)
    assert len(t) == len(PAPER_NUMBERS)
    s = summarise(trials)
    c = comparison_table(s, "SmolLM2-135M-Instruct", 135e6)
    assert set(c.condition) == {"steering", "meta_prompt"}
    ours = c[(c.condition == "steering") & (c.quantity == "esr_rate")]
    assert (ours.our_value == 0.25).all() and np.allclose(ours.our_params_b, 0.135)
    assert len(ours) == 5  # 70B, 8B and three Gemma-2 sizes
    ratio = c[c.quantity == "multi_attempt_ratio_vs_steering"].iloc[0]
    assert ratio.paper_value == 4.3 and ratio.our_value == pytest.approx((4 / 6) / (4 / 8))
    mapped = comparison_table(s.replace({"condition": {"meta_prompt": "mp_offtrack"}}), "m", 0.135,
                              condition_map={"meta_prompt": "mp_offtrack"})
    assert "mp_offtrack" in set(mapped.condition)
    assert comparison_table(summarise(pd.DataFrame()), "m", 1).empty


def test_export_png_when_kaleido_and_chromium_present(tmp_path):
    import shutil

    pytest.importorskip("kaleido")
    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("no Chrome/Chromium for kaleido")
    fig = rp.first_last_scatter(pd.DataFrame())
    written = rp.export_figure(fig, tmp_path / "fig")
    assert [p.name for p in written] == ["fig.html", "fig.png"]
    assert written[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_paper_table_has_no_raw_none_and_one_trial_is_a_marker():
    import json

    from esr_core.experiments.report import paper_table as run_paper_table
    from esr_core.experiments.store import REFERENCE_DIR, load_trials

    summary = json.loads((REFERENCE_DIR / "summary.json").read_text())
    cells = run_paper_table(summary).astype(str).values.ravel().tolist()
    assert cells and not any(c in ("None", "nan", "NaN") for c in cells)
    trials = load_trials(REFERENCE_DIR)
    fig = rp.score_delta_figure(trial_table_flags(trials), summarise(trials))
    one = next(t for t in fig.data if t.name == "Δ score · meta_prompt")
    assert one.type == "scatter" and list(one.x) == pytest.approx([3.6])
    assert tuple(fig.layout.xaxis.range) == (-105, 105)
