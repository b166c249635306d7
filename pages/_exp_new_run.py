"""Experiments page, part: start a new run, follow it, resume an unfinished one."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from esr_core.errors import EsrError
from esr_core.experiments.conditions import BASE_CONDITIONS, META_PROMPTS
from esr_core.experiments.runner import make_executor, ray_available, start_run_job
from esr_core.experiments.spec import ExperimentSpec
from esr_core.experiments.store import SPEC_FILE, default_run_dir
from pages._jobs import job_panel


def _show(job) -> None:
    st.session_state.exp_view = str(job.info["run_dir"])


def progress_section() -> None:
    """This session's run, at the top of the page: progress, Cancel, then Show."""
    job = st.session_state.get("exp_job")
    if job is None:
        return
    with st.container(border=True):
        st.markdown(f"**Experiment {job.info.get('title', '')}** · `{job.info.get('run_dir')}`")
        job_panel("exp_job", "Cancelling after the current batch; finished trials stay on disk.", "Show this run",
                  _show)


def new_run_section(runs: list[dict], labels: dict) -> None:
    ss = st.session_state
    st.subheader("New run")
    job = ss.get("exp_job")
    running = job is not None and job.running
    if running:
        st.caption("This session's run is in progress (its progress is at the top of the page).")
    # outside the form so the fields follow the boost mode at once
    b1, b2 = st.columns(2)
    mode = b1.selectbox("Boost", ["fixed", "calibrate", "sweep"], key="exp_boost_mode",
                        help="fixed: one boost for every latent; calibrate: per latent, the boost that brings the first "
                             "attempt's score to 30/100; sweep: levels around the calibrated thresholds")
    with st.form("exp_form"):
        st.caption("Small runs finish in minutes on a CPU; each trial is saved as soon as it is judged.")
        c1, c2, c3 = st.columns(3)
        name = c1.text_input("Name", value=time.strftime("exp-%Y%m%d-%H%M"))
        n_lat = c2.number_input("Distractor latents", 1, 200, 2)
        n_pr = c3.number_input("Prompts per latent", 1, 50, 2)
        conds = st.multiselect("Conditions", list(BASE_CONDITIONS), default=["no_steering", "steering", "meta_prompt"])
        metas = st.multiselect("Meta-prompt variants (first = 'meta_prompt')", list(META_PROMPTS),
                               default=["get_back_on_track"])
        c1, c2 = st.columns(2)
        mnt = c1.number_input("Max new tokens", 8, 512, 48)
        boost, steps = 1.0, 3
        if mode == "fixed":
            boost = c2.number_input("Fixed boost (× median residual norm)", 0.0, 20.0, 1.0, step=0.1)
        else:
            steps = c2.number_input("Calibration steps", 0, 12, 3)
        rule = st.radio("Relevance rule", ["code", "paper"], horizontal=True,
                        help="code: the latent never fires on any prompt token; paper: not among any prompt's top-100")
        where, workers = "in-process", None
        if ray_available():
            e1, e2 = st.columns(2)
            where = e1.radio("Run on", ["in-process", "ray"], horizontal=True, key="exp_executor",
                             help="ray: batches, judging and calibration on Ray actors (a local Ray, or the cluster "
                                  "in RAY_ADDRESS); this process alone writes the run folder")
            workers = int(e2.number_input("Ray actors", 1, 64, 2, key="exp_workers"))
        submitted = st.form_submit_button("Start run", disabled=running, type="primary")
    if submitted:
        try:
            spec = ExperimentSpec.from_dict({
                "name": name, "model": ss.get("model_choice") or "smollm2-135m-instruct",
                "sae": ss.get("engine_key", (None, None))[1] if ss.get("engine_key") else None,
                "n_latents": int(n_lat), "prompts_per_latent": int(n_pr), "conditions": conds or ["steering"],
                "meta_variants": metas or ["get_back_on_track"], "max_new_tokens": int(mnt), "boost_mode": mode,
                "boost": float(boost) if mode == "fixed" else None, "calib_steps": int(steps),
                "relevance_rule": rule,
                "dtype": getattr(getattr(ss.get("engine"), "model", None), "dtype", "float32")})
            run_dir = default_run_dir(spec.name)
            if (run_dir / SPEC_FILE).exists():
                st.error(f"A run named '{spec.name}' exists; choose another name or resume it below.")
            else:
                ex = make_executor(where, workers=workers) if where == "ray" else None
                ss.exp_job = start_run_job(spec, run_dir, engine=ss.get("engine"), executor=ex)
                st.rerun()
        except EsrError as exc:
            st.error(str(exc))
    unfinished = [r for r in runs if not r.get("shipped") and r.get("stage") not in ("done", "")]
    mine = str(job.info.get("run_dir")) if running else None
    elsewhere = [r for r in unfinished if r.get("locked") and r["dir"] != mine]
    incomplete = [r for r in unfinished if not r.get("locked")]
    if elsewhere:
        st.caption("Running in another session (follow it by opening it above; it cannot be resumed twice): "
                   + ", ".join(r["name"] for r in elsewhere))
    if incomplete and not running:
        pick = st.selectbox("Resume an unfinished run", [r["dir"] for r in incomplete],
                            format_func=lambda d: labels.get(d, d), key="exp_resume_pick")
        if st.button("Resume", key="exp_resume"):
            try:
                spec = ExperimentSpec.load(Path(pick) / SPEC_FILE)
                ss.exp_job = start_run_job(spec, pick, resume=True, engine=ss.get("engine"))
                st.rerun()
            except EsrError as exc:
                st.error(str(exc))
