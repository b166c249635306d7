"""Experiments: the shipped reference ESR run, previous runs, and new runs with progress + cancel.

Thin page: runs, tables and figures come from esr_core.experiments (arXiv 2602.06941). A new
run works in a background thread that appends every finished trial to disk, so a page rerun
(or closing the tab) loses nothing; a fragment polls its progress.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from esr_core.errors import EsrError
from esr_core.experiments.attribution import attribution_caption, attribution_reports
from esr_core.experiments.cases import MAX_DESCRIBED, esr_cases, lab_setup
from esr_core.experiments.metrics import trial_table_flags
from esr_core.experiments.report import (
    dropped_note,
    figures_for,
    load_summary,
    models_table,
    paper_table,
    rates_table,
    skipped_note,
)
from esr_core.experiments.store import (
    GEN_FILE,
    PARQUET_FILE,
    REFERENCE_DIR,
    SUMMARY_FILE,
    TRIALS_FILE,
    list_runs,
    load_spec,
    load_trials,
)
from esr_core.models.registry import DEFAULT_MODEL
from esr_core.viz.result_plots import attribution_figure
from pages import _ui
from pages._exp_new_run import new_run_section, progress_section
from pages._exp_overlay import overlay_section
from pages._sidebar import request_model

_ui.require_frame()

ss = st.session_state
st.title("Experiments")
st.caption("Measure Endogenous Steering Resistance: steer with a distractor latent and count how often the "
           "model restarts (multi-attempt) and improves after restarting (ESR), per condition, with Wilson 95 % "
           "intervals. Method: arXiv 2602.06941.")


def _mtime(d: Path) -> float:
    fs = [d / f for f in (SUMMARY_FILE, TRIALS_FILE, GEN_FILE, PARQUET_FILE)]
    return max((f.stat().st_mtime for f in fs if f.exists()), default=0.0)


@st.cache_data(show_spinner=False, max_entries=16)
def _load(run_dir: str, _mt: float) -> tuple[dict, pd.DataFrame]:
    d = Path(run_dir)
    live = (d / TRIALS_FILE).exists()
    return load_summary(d, recompute=live), load_trials(d)


progress_section()

# ------------------------------------------------------------------ which run
runs = list_runs()
if not runs:
    st.info("No experiment runs yet, and the reference run is not shipped in this checkout. "
            "Start a small run below.")
labels = {r["dir"]: (f"{r['name']} (reference, shipped)" if r.get("reference") else
                     f"{r['name']} (shipped) · {r.get('trials', 0)} trials" if r.get("shipped") else
                     f"{r['name']} · {r.get('trials', 0)} trials · "
                     + ("running" if r.get("locked") else r.get("stage") or "finished")) for r in runs}
current = ss.get("exp_view")
dirs = [r["dir"] for r in runs]
if current not in dirs:
    current = dirs[0] if dirs else None
if dirs:
    current = st.selectbox("Run", dirs, index=dirs.index(current), format_func=lambda d: labels.get(d, d),
                           key="exp_pick")
    ss.exp_view = current


def open_in_lab(run_dir: str, row: dict) -> None:
    """Rerun one trial in the lab: its model (the sidebar switches), prompt, steering, meta-prompt, seed."""
    try:
        setup = lab_setup(load_spec(run_dir), row)
    except (EsrError, KeyError, ValueError) as exc:
        ss["_open_trial_error"] = f"Cannot open this trial: {exc}"
        return
    ss.pending_example = setup
    if setup["model"] != ss.get("model_choice", DEFAULT_MODEL):
        request_model(setup["model"])
    ss["_go_lab"] = True


if ss.pop("_go_lab", False):
    st.switch_page("pages/steering.py")
if ss.get("_open_trial_error"):
    st.error(ss.pop("_open_trial_error"))


def show_run(run_dir: str) -> None:
    d = Path(run_dir)
    try:
        summary, trials = _load(run_dir, _mtime(d))
    except EsrError as exc:
        st.error(str(exc))
        return
    n_per = summary.get("n_per_condition", {})
    st.markdown(f"**{summary.get('model')}** · SAE at `{summary.get('hook')}` · judge `{summary.get('judge_id')}` · "
                f"{summary.get('n_latents')} distractor latents × {summary.get('prompts_per_latent')} prompts · "
                f"{summary.get('max_new_tokens')} new tokens, T={summary.get('temperature')}, "
                f"repetition penalty {summary.get('repetition_penalty')} · boost: {summary.get('boost_mode')} · "
                f"relevance rule: {summary.get('relevance_rule')}")
    st.caption("n per condition: " + ", ".join(f"{c} {n}" for c, n in n_per.items())
               + ("" if summary.get("complete") else
                  f" · incomplete: {summary.get('n_trials')} of {summary.get('n_trials_planned')} planned trials"))
    st.info(summary.get("headline", ""))
    cases = esr_cases(trial_table_flags(trials)) if len(trials) else trials
    for k, (_, row) in enumerate(cases.head(MAX_DESCRIBED).iterrows()):
        st.button(f"Open ESR trial {k + 1} in the steering lab" if len(cases) > 1 else
                  "Open the ESR trial in the steering lab", key=f"open_case_{k}_{d.name}",
                  on_click=open_in_lab, args=(run_dir, row.to_dict()))
    st.subheader("Rates per condition")
    st.dataframe(rates_table(summary), hide_index=True, width="stretch")
    if dropped_note(summary):
        st.caption("Dropped trials: " + dropped_note(summary))
    if skipped_note(summary):
        st.caption("Skipped conditions: " + skipped_note(summary))
    figs = figures_for(trials)
    names = {"score_delta": "Score change & rates", "condition_comparison": "Conditions",
             "rates_vs_boost": "Rates vs boost", "first_last": "First vs last"}
    tabs = st.tabs([names[k] for k in figs])
    for tab, (key, fig) in zip(tabs, figs.items()):
        with tab:
            st.plotly_chart(fig, key=f"fig_{key}_{d.name}")
            c1, c2 = st.columns(2)
            c1.download_button("HTML", fig.to_html(include_plotlyjs=True, full_html=True), file_name=f"{key}.html",
                               mime="text/html", key=f"html_{key}_{d.name}")
            if c2.button("Prepare PNG", key=f"pngprep_{key}_{d.name}"):
                try:
                    ss[f"png_{key}_{d.name}"] = fig.to_image(format="png", scale=2)
                except Exception as exc:  # kaleido/Chromium missing
                    st.warning(f"PNG export is unavailable here: {str(exc).splitlines()[0][:160]}")
            if ss.get(f"png_{key}_{d.name}"):
                c2.download_button("PNG", ss[f"png_{key}_{d.name}"], file_name=f"{key}.png", mime="image/png",
                                   key=f"png_dl_{key}_{d.name}")
    overlay_section(d, reference=d == REFERENCE_DIR)
    like_dir = next((Path(r["dir"]) for r in runs if summary.get("like") and Path(r["dir"]).name == summary["like"]),
                    None)
    if like_dir is not None:
        st.subheader(f"Against {like_dir.name}: the same trials on another model")
        try:
            other, _ = _load(str(like_dir), _mtime(like_dir))
        except EsrError as exc:
            st.caption(f"Cannot read {like_dir.name}: {exc}")
        else:
            st.dataframe(models_table(summary, other), hide_index=True, width="stretch")
            st.caption(f"Same latents, prompts, boosts (calibrated on {other.get('model')}) and seeds; counts with "
                       "Wilson 95 % intervals. An interval that does not overlap the other model's is a real "
                       "difference at this n.")
    for k, attribution in enumerate(attribution_reports(d)):
        st.subheader(f"What drives the restarts at {attribution.get('read_hook', '?')} (attribution, confirmed by "
                     "ablation)")
        if "error" in attribution:
            st.warning(attribution["error"])
            continue
        st.plotly_chart(attribution_figure(attribution), key=f"attr_{d.name}_{k}")
        st.caption(attribution_caption(attribution))
    st.subheader("Against the paper")
    pt = paper_table(summary)
    if len(pt):
        st.dataframe(pt, hide_index=True, width="stretch")
        st.caption("Model size is the context: the paper finds ESR mainly in Llama-3.3-70B (3.8 %) and < 1 % in "
                   "8B and smaller models; ours is a 0.135B model with an offline judge.")
    else:
        st.caption("No condition of this run has a counterpart in the paper's table.")
    thr = summary.get("throughput") or {}
    if thr.get("tokens_per_s"):
        env = summary.get("environment") or {}
        st.caption(f"Generation: {thr['generated_tokens']:,} tokens, {thr['tokens_per_s']} tokens/s on "
                   f"{env.get('gpu') or env.get('device', '?')}.")
    c1, c2 = st.columns(2)
    if (d / PARQUET_FILE).exists():
        c1.download_button("trials.parquet", (d / PARQUET_FILE).read_bytes(), file_name="trials.parquet",
                           key=f"dl_parquet_{d.name}")
    c2.download_button("summary.json", json.dumps(summary, indent=1), file_name="summary.json",
                       mime="application/json", key=f"dl_summary_{d.name}")
    with st.expander("Trials (one row per trial): pick one to rerun it in the steering lab",
                     expanded=bool(ss.get(f"trials_{d.name}"))):
        cols = [c for c in ("condition", "latent", "latent_label", "prompt_id", "boost_norm", "seed", "n_attempts",
                            "first_score", "last_score", "degraded", "response") if c in trials.columns]
        ev = st.dataframe(trials[cols], hide_index=True, width="stretch", on_select="rerun",
                          selection_mode="single-row", key=f"trials_{d.name}")
        rows = list(getattr(getattr(ev, "selection", None), "rows", []) or [])
        if rows:
            row = trials.iloc[int(rows[0])]
            st.button(f"Open this trial in the steering lab ({row['condition']}, #{int(row['latent'])}, seed "
                      f"{int(row['seed'])})", key=f"open_trial_{d.name}", type="primary",
                      on_click=open_in_lab, args=(run_dir, row.to_dict()))
        else:
            st.caption("Select a row (its left edge) to open that trial in the steering lab.")


if current:
    show_run(current)

st.divider()
new_run_section(runs, labels)
