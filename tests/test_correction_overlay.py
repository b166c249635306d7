"""Correction overlay: alignment maths, a small real replay (trials + synthetic), CLI, figure, page."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from esr_core.errors import BadInput, Cancelled
from esr_core.experiments import overlay as co
from esr_core.experiments import overlay_summary as cs

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "assets" / "experiments" / "reference"
DEFAULT_SAE = ROOT / "assets" / "sae" / "smollm2-135m-instruct"
needs_sae = pytest.mark.skipif(not (DEFAULT_SAE / "cfg.json").exists(), reason="default SAE not in this checkout")
needs_ref = pytest.mark.skipif(not (REF / "trials.parquet").exists(), reason="reference run not shipped")


# ----------------------------------------------------------------------------- pure maths

def test_aligned_stats_pads_with_nan_and_counts_episodes_per_offset():
    # episode A: 5 tokens, correction at 3; B: 3 tokens, correction at 0; C: correction outside -> left out
    st = cs.aligned_stats([[0, 1, 2, 3, 4], [10, 20, 30], [1, 1]], [3, 0, 7], window=2)
    assert st["offsets"] == [-2, -1, 0, 1, 2]
    assert st["n"] == [1, 1, 2, 2, 1]
    assert st["mean"] == [1.0, 2.0, 6.5, 12.0, 30.0]
    # SE = sample sd / sqrt(n); None where n < 2
    assert st["se"][0] is None and st["se"][4] is None
    assert st["se"][2] == pytest.approx(np.std([3, 10], ddof=1) / math.sqrt(2), rel=1e-4)
    assert st["se"][3] == pytest.approx(np.std([4, 20], ddof=1) / math.sqrt(2), rel=1e-4)
    # asymmetric window; an offset nobody reaches has n = 0 and no mean
    st = cs.aligned_stats([[5, 6]], [0], (1, 3))
    assert st["offsets"] == [-1, 0, 1, 2, 3] and st["n"] == [0, 1, 1, 0, 0]
    assert st["mean"] == [None, 5.0, 6.0, None, None]


def test_region_ratios_against_the_baseline():
    # alpha 1 = raw series, so region means are plain means
    eps = [{"circuit": [0, 4, 4, 9, 1, 1], "backtracking": None, "distractor": None, "corr": 3, "corr_end": 4,
            "off": [1, 3], "off_topic": True},
           {"circuit": [0, 2, 2, 2, 9, 3, 3], "backtracking": None, "distractor": None, "corr": 4, "corr_end": 5,
            "off": [1, 4], "off_topic": True},
           {"circuit": [7, 7, 7, 0, 5], "backtracking": None, "distractor": None, "corr": 3, "corr_end": 4,
            "off": [0, 3], "off_topic": False}]  # first attempt on-topic: no off-topic region
    out = cs.summarise_source(eps, {"circuit": 0.5}, window=2, alpha=1.0)
    reg = out["regions"]["circuit"]
    assert reg["off_topic"]["n"] == 2 and reg["off_topic"]["mean"] == pytest.approx(3.0)  # (4 + 2) / 2
    assert reg["off_topic"]["ratio"] == pytest.approx(6.0)
    assert reg["after_correction"]["n"] == 3
    assert reg["after_correction"]["mean"] == pytest.approx((1 + 3 + 5) / 3)
    assert reg["after_correction"]["ratio"] == pytest.approx(2 * 3.0, rel=1e-3)
    assert reg["correction"]["mean"] == pytest.approx((9 + 9 + 0) / 3)
    assert "backtracking" not in out["signals"] and out["signals"]["circuit"]["n"] == [3, 3, 3, 3, 2]
    # no baseline (a silent circuit): no ratio, means still there
    out = cs.summarise_source(eps, {"circuit": 0.0}, window=1, alpha=1.0)
    assert out["regions"]["circuit"]["off_topic"]["ratio"] is None
    assert out["regions"]["circuit"]["off_topic"]["mean"] == pytest.approx(3.0)


def test_char_offsets_map_to_response_tokens():
    text = "PROMPT:hi\nANSWER: Wait, no. Ok.<end>"
    resp = " Wait, no. Ok."
    offs = [(0, 6), (6, 7), (7, 9), (9, 10), (10, 17), (17, 22), (22, 23), (23, 26), (26, 27), (27, 30), (30, 31),
            (31, 36)]
    base, first, last = cs.locate_response(text, offs, resp)
    assert text[base:base + len(resp)] == resp and first == 5 and last == 11
    assert cs.char_token(offs, base, first, last, resp.index("no")) == 2
    assert cs.span_tokens(offs, base, first, last, resp.index("Ok"), len(resp)) == (4, 6)
    with pytest.raises(BadInput):
        cs.locate_response(text, offs, "not there")


def test_synthetic_specs_know_their_drift_and_restart_spans():
    specs = co.synthetic_specs(5, co.OverlayParams())
    assert len(specs) == 5 and len({s["key"] for s in specs}) == 5
    for s in specs:
        r = s["response"]
        restart = r[s["corr_char"]:s["corr_end_char"]]
        assert restart == s["restart"] and restart[0].isupper() and not s["interventions"]
        a, b = s["off_chars"]
        assert 0 < a < b < s["corr_char"] and r[a - 1] == " "


@needs_ref
def test_reference_trial_spec_carries_the_runs_intervention():
    specs, skipped = co.trial_specs(REF, co.OverlayParams())
    assert len(specs) == 1 and not skipped
    t = specs[0]
    assert t["response"][t["corr_char"]:].startswith("Let me start from scratch")
    assert t["prompt"].endswith("get back on track.")  # the meta-prompt condition: the prompt that was sent
    assert [iv["mode"] for iv in t["interventions"]] == ["add"] and t["interventions"][0]["latent"] == t["distractor"]


def test_params_are_validated():
    with pytest.raises(BadInput):
        co.OverlayParams(window=0).validate()
    with pytest.raises(BadInput):
        co.OverlayParams(ema_alpha=0).validate()


# ----------------------------------------------------------------------------- figure

def _fake_overlay() -> dict:
    sig = {"offsets": [-1, 0, 1], "mean": [0.1, 0.5, None], "se": [None, 0.1, None], "n": [1, 2, 0]}
    return {"format": cs.FORMAT, "ema_alpha": 0.5, "baseline": {"circuit": 0.05, "backtracking": 1.0},
            "sources": {"synthetic": {"label": "synthetic recoveries", "n_episodes": 2, "steering": "off",
                                      "signals": {"circuit": sig, "backtracking": sig}},
                        "trials": {"label": "t", "n_episodes": 0, "steering": "n/a", "signals": {}}},
            "ratios": {"synthetic": {"circuit": {"off_topic": 4.0, "after_correction": 2.0}}}}


def test_overlay_figure_has_bands_a_zero_line_and_n():
    from esr_core.viz.result_plots import correction_overlay_figure

    ov = _fake_overlay()
    fig = correction_overlay_figure(ov, "synthetic")
    names = [t.name for t in fig.data]
    assert "resistance circuit" in names and "backtracking" in names and "episodes (n)" in names
    bar = next(t for t in fig.data if t.name == "episodes (n)")
    assert list(bar.y) == [1, 2, 0]
    line = next(t for t in fig.data if t.name == "resistance circuit")
    assert line.y[1] == pytest.approx(0.5 / 0.05)  # scaled to the on-topic baseline
    assert any(getattr(s, "x0", None) == 0 and s.type == "line" for s in fig.layout.shapes)
    assert "steering off" in fig.layout.title.text and "4.0×" in fig.layout.title.text
    raw = correction_overlay_figure(ov, "synthetic", scale="raw")
    assert next(t for t in raw.data if t.name == "resistance circuit").y[1] == pytest.approx(0.5)
    assert not correction_overlay_figure(ov, "trials").data  # no episodes: annotated empty figure
    assert not correction_overlay_figure(None).data


# ----------------------------------------------------------------------------- real replay

@pytest.fixture(scope="module")
def small_overlay(engine, tmp_path_factory):
    if not (DEFAULT_SAE / "cfg.json").exists() or not (REF / "trials.parquet").exists():
        pytest.skip("needs the default SAE and the reference run")
    run = tmp_path_factory.mktemp("ov") / "run"
    run.mkdir()
    for f in ("spec.json", "trials.parquet", "detector_group.json"):
        shutil.copy(REF / f, run / f)
    params = co.OverlayParams(n_synthetic=3, window=12, n_baseline=6, max_answer_chars=300)
    cancel = threading.Event()
    seen = []

    def stop_after_two(step):
        seen.append((step.done, step.total))
        if step.done >= 2:
            cancel.set()

    with pytest.raises(Cancelled):
        co.compute_overlay(run, engine, params, progress=stop_after_two, cancel=cancel)
    assert not (run / cs.OVERLAY_FILE).exists()
    kept = len((run / cs.PARTIAL_FILE).read_text().splitlines())
    assert kept >= 2
    totals = []
    ov = co.compute_overlay(run, engine, params, progress=lambda s: totals.append(s.total))
    return run, params, ov, seen[0][1], kept, totals[0]


@needs_sae
@needs_ref
def test_small_real_overlay(small_overlay, engine):
    run, params, ov, first_total, kept, resumed_total = small_overlay
    # resumed: only the chats not replayed before the cancel
    assert resumed_total == first_total - kept
    assert not (run / cs.PARTIAL_FILE).exists()
    assert json.loads((run / cs.OVERLAY_FILE).read_text()) == ov
    assert ov["window"] == [-12, 12]
    syn, tri = ov["sources"]["synthetic"], ov["sources"]["trials"]
    assert syn["n_episodes"] == 3 and syn["steering"] == "off"
    assert tri["n_episodes"] == 1 and tri["steering"] == "on" and tri["conditions"] == {"meta_prompt": 1}
    for block, n_ep in ((syn, 3), (tri, 1)):
        for name, s in block["signals"].items():
            assert s["offsets"] == list(range(-12, 13))
            assert all(0 <= n <= n_ep for n in s["n"]) and s["n"][12] == n_ep  # everyone has offset 0
            for m, n in zip(s["mean"], s["n"]):
                assert (m is not None and math.isfinite(m)) if n > 0 else m is None
    assert "distractor" in tri["signals"] and "distractor" not in syn["signals"]
    # the trial was replayed with its boost on: the distractor fires throughout
    assert tri["episodes"][0]["distractor"]["off_topic"] > 1.0
    assert ov["baseline"]["n_answers"] == 6
    base = ov["baseline"]["circuit"]
    assert base > 0  # two of the first six on-topic answers make the (sparse) circuit fire
    for s in ("synthetic", "trials"):
        r = ov["ratios"][s]["circuit"]
        reg = ov["sources"][s]["regions"]["circuit"]
        assert r["off_topic"] == pytest.approx(reg["off_topic"]["mean"] / base, rel=1e-3)
        assert r["after_correction"] == pytest.approx(reg["after_correction"]["mean"] / base, rel=1e-3)
        assert reg["after_correction"]["n"] == ov["sources"][s]["n_episodes"]
    # unchanged inputs: the saved overlay is reused without a forward pass
    calls = []
    again = co.compute_overlay(run, engine, params, progress=lambda *a: calls.append(a))
    assert again == ov and not calls
    assert "steering on" in cs.describe(ov) and "steering off" in cs.describe(ov)


@needs_sae
def test_cli_overlay_for_a_folder_without_a_run(engine, tmp_path, capsys):
    from esr_core.cli import main

    out = tmp_path / "syn"
    assert main(["experiment", "overlay", str(out), "--synthetic", "2", "--baseline", "3", "--window", "6",
                 "--json"]) == 0
    ov = json.loads(capsys.readouterr().out)
    assert set(ov["sources"]) == {"synthetic"} and ov["sources"]["synthetic"]["n_episodes"] == 2
    assert ov["window"] == [-6, 6] and (out / "overlay.json").exists()
    assert main(["experiment", "overlay", str(out), "--synthetic", "2", "--baseline", "3", "--window", "6"]) == 0
    text = capsys.readouterr().out
    assert "synthetic recoveries" in text and "steering off" in text
    assert main(["experiment", "overlay", str(tmp_path / "empty"), "--synthetic", "0"]) == 2


# ----------------------------------------------------------------------------- page

@pytest.mark.skipif(not (REF / cs.OVERLAY_FILE).exists(), reason="reference overlay not computed")
def test_experiments_page_shows_the_reference_overlay():
    from conftest import open_app_page

    at = open_app_page("pages/experiments.py")
    assert not at.exception, at.exception
    assert any(h.value == "Activity around corrections" for h in at.subheader)
    ov = cs.load_overlay(REF)
    caps = [c.value for c in at.caption]
    assert cs.describe(ov) in caps
    assert "steering on" in cs.describe(ov) and "steering off" in cs.describe(ov)
    labels = [t.label for t in at.tabs]
    assert any("synthetic recoveries" in lab and "steering off" in lab for lab in labels)
    assert any("multi-attempt trials" in lab and "steering on" in lab for lab in labels)
    charts = at.get("plotly_chart")
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in charts]
    assert sum("Activity around the correction point" in t for t in titles) == 2
