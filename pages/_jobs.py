"""The panel of a long background job (experiment run, overlay): progress, Cancel, outcome.

One fragment polls the job every two seconds, so the rest of the page never reruns for it.
"""

from __future__ import annotations

from typing import Callable

import streamlit as st


@st.fragment(run_every=2.0)
def job_panel(key: str, cancel_note: str, show_label: str, on_show: Callable[[object], None]) -> None:
    """The :class:`esr_core.jobs.BackgroundJob` kept in ``st.session_state[key]``, if any."""
    job = st.session_state.get(key)
    if job is None:
        return
    st.progress(job.step.fraction, text=job.step.text())
    if job.running:
        if st.button("Cancel", key=f"{key}_cancel", type="secondary"):
            job.cancel()
            st.toast(cancel_note)
        return
    if job.error:
        st.warning(job.error)
    else:
        st.success("Finished.")
    if st.button(show_label, key=f"{key}_show"):
        on_show(job)
        st.session_state[key] = None
        st.rerun()
