"""Experiments: the shipped reference ESR run, previous runs, and new runs with progress + cancel.

Thin page: runs, tables and figures come from esr_core.experiments.runner (arXiv 2602.06941).
A new run works in a background thread that appends every finished trial to disk, so a page
rerun (or closing the tab) loses nothing; a fragment polls its progress.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from esr_core.experiments import overlay as co
from esr_core.experiments import runner as xr
from esr_core.errors import EsrError
from esr_core.experiments.spec import BASE_CONDITIONS, META_PROMPTS, ExperimentSpec
from esr_core.viz.result_plots import correction_overlay_figure
from esr_core.experiments.report import dropped_note, pct, rates_table, skipped_note
from pages import _ui

_ui.require_frame()

ss = st.session_state
st.title("Experiments")
st.caption("Measure Endogenous Steering Resistance: steer with a distractor latent and count how often the "
           "model restarts (multi-attempt) and improves after restarting (ESR), per condition, with Wilson 95 % "
           "intervals. Method: arXiv 2602.06941.")


def _mtime(d: Path) -> float:
    fs = [d / f for f in (xr.SUMMARY_FILE, xr.TRIALS_FILE, xr.GEN_FILE, xr.PARQUET_FILE)]
    return max((f.stat().st_mtime for f in fs if f.exists()), default=0.0)


@st.cache_data(show_spinner=False, max_entries=16)
def _load(run_dir: str, _mt: float) -> tuple[dict, pd.DataFrame]:
    d = Path(run_dir)
    live = (d / xr.TRIALS_FILE).exists()
    summary = xr.load_summary(d, recompute=live)
    return summary, xr.load_trials(d)


def _paper_value(q: str, v) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(v):
        return "n/a"
    if q.endswith("_rate"):
        return pct(v)
    if "ratio" in q:
        return f"{v:.2f}×"
    if "change" in q:
        return f"{100 * v:+.0f} %"
    return f"{v:g}"


def _size(b) -> str:
    try:
        b = float(b)
    except (TypeError, ValueError):
        return ""
    return "" if not math.isfinite(b) else (f" ({b:g}B)" if b >= 1 else f" ({b * 1000:.0f}M)")


def paper_table(summary: dict) -> pd.DataFrame:
    rows = []
    for r in summary.get("paper_comparison", []):
        q = str(r["quantity"])
        rel = r.get("paper_relation") or "="
        rows.append({"condition": r["condition"], "quantity": q.replace("_", " "),
                     "paper": ("" if rel == "=" else rel + " ") + _paper_value(q, r.get("paper_value")),
                     "paper model": f"{r.get('paper_model')}{_size(r.get('paper_params_b'))}",
                     "paper n": r.get("paper_n"),
                     "ours": _paper_value(q, r.get("our_value")),
                     "ours 95 % CI": f"{pct(r.get('our_lo'))} – {pct(r.get('our_hi'))}" if q.endswith("_rate") else "",
                     "our k/n": f"{r.get('our_k')}/{r.get('our_n')}",
                     "our model": f"{r.get('our_model')}{_size(r.get('our_params_b'))}"})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ which run
runs = xr.list_runs()
if not runs:
    st.info("No experiment runs yet, and the reference run is not shipped in this checkout. "
            "Start a small run below.")
labels = {r["dir"]: (f"{r['name']} (reference, shipped)" if r.get("reference") else
                     f"{r['name']} (shipped) · {r.get('trials', 0)} trials" if r.get("shipped") else
                     f"{r['name']} · {r.get('trials', 0)} trials · {r.get('stage') or 'finished'}") for r in runs}
current = ss.get("exp_view")
dirs = [r["dir"] for r in runs]
if current not in dirs:
    current = dirs[0] if dirs else None
if dirs:
    current = st.selectbox("Run", dirs, index=dirs.index(current), format_func=lambda d: labels.get(d, d),
                           key="exp_pick")
    ss.exp_view = current


@st.fragment(run_every=2.0)
def overlay_panel() -> None:
    job: co.OverlayJob | None = ss.get("overlay_job")
    if job is None:
        return
    p = job.progress or {}
    done, total = int(p.get("done") or 0), int(p.get("total") or 0)
    st.progress(min(done / total, 1.0) if total else 0.0, text=f"overlay: {done}/{total} · {p.get('message', '')}")
    if job.running:
        if st.button("Cancel", key="overlay_cancel", type="secondary"):
            job.cancel.set()
            st.toast("Cancelling; replayed episodes are kept and a new start resumes from them.")
    else:
        if job.error:
            st.warning(job.error)
        else:
            st.success("Overlay computed.")
        if st.button("Show the overlay", key="overlay_show"):
            ss.overlay_job = None
            st.rerun()


def overlay_section(d: Path, reference: bool) -> None:
    """Circuit, backtracking and distractor activity aligned at correction points (saved overlay.json)."""
    st.subheader("Activity around corrections")
    ov = co.load_overlay(d)
    if ov:
        st.caption(co.describe(ov))
        srcs = [s for s in co.SOURCES if s in ov.get("sources", {})]
        tabs = st.tabs([f"{co.SOURCE_LABELS[s]} · steering {ov['sources'][s].get('steering')} · "
                        f"n = {ov['sources'][s].get('n_episodes', 0)}" for s in srcs])
        for tab, s in zip(tabs, srcs):
            with tab:
                fig = correction_overlay_figure(ov, s)
                st.plotly_chart(fig, key=f"overlay_{s}_{d.name}")
                st.download_button("HTML", fig.to_html(include_plotlyjs=True, full_html=True),
                                   file_name=f"correction_overlay_{s}.html", mime="text/html",
                                   key=f"overlay_html_{s}_{d.name}")
        st.caption("Offset 0 is the first token of the restart phrase; each line is the mean EMA (α = 0.5) "
                   "activity over the episodes that have a token at that offset (bottom: n, NaN padding "
                   "elsewhere), with ±1 s.e. Ratios divide region means by the mean activity on unsteered "
                   "on-topic answers.")
    else:
        st.caption("Not computed yet for this run. The overlay replays each multi-attempt trial with its own "
                   "steering, and synthetic recoveries with steering off, and aligns them at the restart.")
    job: co.OverlayJob | None = ss.get("overlay_job")
    mine = job is not None and job.folder == d
    busy = job is not None and job.running
    if not busy and (ov is None or not reference):
        with st.expander("Recompute the overlay" if ov else "Compute the overlay", expanded=ov is None):
            c1, c2 = st.columns(2)
            n_syn = c1.number_input("Synthetic recoveries (steering off)", 0, 500, 48, key=f"ov_syn_{d.name}")
            win = c2.number_input("Window (tokens each side)", 5, 200, 40, key=f"ov_win_{d.name}")
            if st.button("Compute", key=f"ov_go_{d.name}", type="primary"):
                try:
                    params = co.OverlayParams(window=int(win), n_synthetic=int(n_syn)).validate()
                    ss.overlay_job = co.OverlayJob(d, params, engine=ss.get("engine")).start()
                    st.rerun()
                except EsrError as exc:
                    st.error(str(exc))
    if mine:
        overlay_panel()
    elif busy:
        st.caption(f"An overlay is being computed for {job.folder.name}; open that run to follow it.")


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
    st.subheader("Rates per condition")
    st.dataframe(rates_table(summary), hide_index=True, width="stretch")
    if dropped_note(summary):
        st.caption("Dropped trials: " + dropped_note(summary))
    if skipped_note(summary):
        st.caption("Skipped conditions: " + skipped_note(summary))
    figs = xr.figures_for(trials)
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
    overlay_section(d, reference=d == xr.REFERENCE_DIR)
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
    if (d / xr.PARQUET_FILE).exists():
        c1.download_button("trials.parquet", (d / xr.PARQUET_FILE).read_bytes(), file_name="trials.parquet",
                           key=f"dl_parquet_{d.name}")
    c2.download_button("summary.json", json.dumps(summary, indent=1), file_name="summary.json",
                       mime="application/json", key=f"dl_summary_{d.name}")
    with st.expander("Trials (one row per trial)"):
        cols = [c for c in ("condition", "latent", "latent_label", "prompt_id", "boost_norm", "seed", "n_attempts",
                            "first_score", "last_score", "degraded", "response") if c in trials.columns]
        st.dataframe(trials[cols], hide_index=True, width="stretch")


if current:
    show_run(current)

# ------------------------------------------------------------------ a new run
st.divider()
st.subheader("New run")
job: xr.BackgroundRun | None = ss.get("exp_job")


@st.fragment(run_every=2.0)
def job_panel() -> None:
    job = ss.get("exp_job")
    if job is None:
        return
    p = job.progress or {}
    done, total = int(p.get("done") or 0), int(p.get("total") or 0)
    eta = p.get("eta_s")
    eta_txt = f" · ETA {int(eta) // 60} min {int(eta) % 60} s" if isinstance(eta, (int, float)) and eta else ""
    st.progress(min(done / total, 1.0) if total else 0.0,
                text=f"{p.get('stage', 'starting')}: {done}/{total}{eta_txt} · {p.get('message', '')}")
    st.caption(f"Run directory: {job.run_dir}")
    if job.running:
        if st.button("Cancel", key="exp_cancel", type="secondary"):
            job.cancel.set()
            st.toast("Cancelling after the current batch; finished trials stay on disk.")
    else:
        if job.error:
            st.warning(job.error)
        else:
            st.success("Finished.")
        if st.button("Show this run", key="exp_show"):
            ss.exp_view = str(job.run_dir)
            ss.exp_job = None
            st.rerun()


if job is not None:
    job_panel()

running = job is not None and job.running
with st.form("exp_form"):
    st.caption("Small runs finish in minutes on a CPU; each trial is saved as soon as it is judged.")
    c1, c2, c3 = st.columns(3)
    name = c1.text_input("Name", value=time.strftime("exp-%Y%m%d-%H%M"))
    n_lat = c2.number_input("Distractor latents", 1, 200, 2)
    n_pr = c3.number_input("Prompts per latent", 1, 50, 2)
    conds = st.multiselect("Conditions", list(BASE_CONDITIONS), default=["no_steering", "steering", "meta_prompt"])
    metas = st.multiselect("Meta-prompt variants (first = 'meta_prompt')", list(META_PROMPTS),
                           default=["get_back_on_track"])
    c1, c2, c3, c4 = st.columns(4)
    mnt = c1.number_input("Max new tokens", 8, 512, 48)
    mode = c2.selectbox("Boost", ["fixed", "calibrate", "sweep"])
    boost = c3.number_input("Fixed boost (× median residual norm)", 0.0, 20.0, 1.0, step=0.1)
    steps = c4.number_input("Calibration steps", 0, 12, 3)
    rule = st.radio("Relevance rule", ["code", "paper"], horizontal=True,
                    help="code: the latent never fires on any prompt token; paper: not among any prompt's top-100")
    submitted = st.form_submit_button("Start run", disabled=running, type="primary")
if submitted:
    try:
        spec = ExperimentSpec.from_dict({
            "name": name, "model": ss.get("model_choice") or "smollm2-135m-instruct",
            "sae": ss.get("engine_key", (None, None))[1] if ss.get("engine_key") else None,
            "n_latents": int(n_lat), "prompts_per_latent": int(n_pr), "conditions": conds or ["steering"],
            "meta_variants": metas or ["get_back_on_track"], "max_new_tokens": int(mnt), "boost_mode": mode,
            "boost": float(boost) if mode == "fixed" else None, "calib_steps": int(steps),
            "relevance_rule": rule})
        run_dir = xr.default_run_dir(spec.name)
        if (run_dir / xr.SPEC_FILE).exists():
            st.error(f"A run named '{spec.name}' exists; choose another name or resume it below.")
        else:
            ss.exp_job = xr.BackgroundRun(spec, run_dir, engine=ss.get("engine")).start()
            st.rerun()
    except EsrError as exc:
        st.error(str(exc))

incomplete = [r for r in runs if not r.get("shipped") and r.get("stage") not in ("done", "")]
if incomplete and not running:
    pick = st.selectbox("Resume an unfinished run", [r["dir"] for r in incomplete],
                        format_func=lambda d: labels.get(d, d), key="exp_resume_pick")
    if st.button("Resume", key="exp_resume"):
        try:
            spec = ExperimentSpec.load(Path(pick) / xr.SPEC_FILE)
            ss.exp_job = xr.BackgroundRun(spec, pick, resume=True, engine=ss.get("engine")).start()
            st.rerun()
        except EsrError as exc:
            st.error(str(exc))
