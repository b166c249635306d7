"""ESR Lab: Streamlit entry point (navigation, model/SAE choice, the shared engine).

One engine per (model, SAE) is shared by every session (the engine scopes steering per
request, so concurrent sessions never leak into each other); it loads in the background, so
pages that need no model draw at once. Everything else a user does lives in
``st.session_state`` (one workspace per model and SAE) and the shareable part in the URL.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from esr_core.paths import offline_env
from pages import _sidebar, _ui

offline_env()
st.set_page_config(page_title="ESR Lab", page_icon=":material/explore:", layout="wide")
ROOT = Path(__file__).resolve().parent

PAGES = (("pages/home.py", "Home", ":material/home:"), ("pages/latents.py", "Latents", ":material/search:"),
         ("pages/steering.py", "Steering lab", ":material/science:"),
         ("pages/resistance.py", "Resistance", ":material/shield:"),
         ("pages/experiments.py", "Experiments", ":material/monitoring:"))


def navigation():
    """The fixed list of pages: a missing page file is an error, never a silently shorter menu."""
    missing = [f for f, _, _ in PAGES if not (ROOT / f).exists()]
    if missing:
        raise FileNotFoundError(f"ESR Lab is incomplete: {', '.join(missing)} missing")
    return st.navigation([st.Page(f, title=title, icon=icon, default=(k == 0))
                          for k, (f, title, icon) in enumerate(PAGES)])


_ui.enter_frame()
try:
    _ui.init_state()
    pg = navigation()
    with st.sidebar:
        st.subheader("Model and SAE")
        model, sae, read_sae = _sidebar.choice()
        _sidebar.ensure_engine(model, sae, read_sae)
        _sidebar.status()
    pg.run()
    _ui.sync_url()
finally:
    _ui.exit_frame()
