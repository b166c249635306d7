"""Experiments page, part: activity around corrections (the saved correction overlay of a run)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from esr_core.errors import EsrError
from esr_core.experiments.overlay import OverlayParams, start_overlay_job
from esr_core.experiments.overlay_summary import SOURCE_LABELS, SOURCES, describe, load_overlay
from esr_core.viz.result_plots import correction_overlay_figure
from pages._jobs import job_panel


def overlay_section(d: Path, reference: bool) -> None:
    """Circuit, backtracking and distractor activity aligned at correction points (saved overlay.json)."""
    ss = st.session_state
    st.subheader("Activity around corrections")
    ov = load_overlay(d)
    if ov:
        st.caption(describe(ov))
        srcs = [s for s in SOURCES if s in ov.get("sources", {})]
        tabs = st.tabs([f"{SOURCE_LABELS[s]} · steering {ov['sources'][s].get('steering')} · "
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
    job = ss.get("overlay_job")
    mine = job is not None and job.info.get("folder") == d
    busy = job is not None and job.running
    if not busy and (ov is None or not reference):
        with st.expander("Recompute the overlay" if ov else "Compute the overlay", expanded=ov is None):
            c1, c2 = st.columns(2)
            n_syn = c1.number_input("Synthetic recoveries (steering off)", 0, 500, 48, key=f"ov_syn_{d.name}")
            win = c2.number_input("Window (tokens each side)", 5, 200, 40, key=f"ov_win_{d.name}")
            if st.button("Compute", key=f"ov_go_{d.name}", type="primary"):
                try:
                    params = OverlayParams(window=int(win), n_synthetic=int(n_syn)).validate()
                    ss.overlay_job = start_overlay_job(d, params, engine=ss.get("engine"))
                    st.rerun()
                except EsrError as exc:
                    st.error(str(exc))
    if mine:
        job_panel("overlay_job", "Cancelling; replayed episodes are kept and a new start resumes from them.",
                  "Show the overlay", lambda _job: None)
    elif busy:
        st.caption(f"An overlay is being computed for {job.info.get('folder').name}; open that run to follow it.")
