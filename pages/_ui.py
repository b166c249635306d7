"""Streamlit helpers shared by the pages: session state, URL sync, the engine in use.

Only widget plumbing lives here; anything that computes lives in esr_core.app.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from esr_core.app import run_store, url_state, workspace
from esr_core.app.latent_view import description
from esr_core.errors import BadInput
from esr_core.experiments.conditions import DEFAULT_META_VARIANT
from esr_core.latents.groups import LatentGroup
from esr_core.steering.interventions import Intervention

_FRAME_ATTR = "_esr_lab_frame"


def _ctx():
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    return get_script_run_ctx()


def enter_frame() -> None:
    """Mark this script run as running inside app.py (kept on the run's context, not in a
    module, because Streamlit may re-import page helper modules between runs)."""
    ctx = _ctx()
    if ctx is not None:
        setattr(ctx, _FRAME_ATTR, True)


def exit_frame() -> None:
    ctx = _ctx()
    if ctx is not None:
        setattr(ctx, _FRAME_ATTR, False)


def _frame_active() -> bool:
    ctx = _ctx()
    return ctx is None or bool(getattr(ctx, _FRAME_ATTR, False))


def require_frame() -> None:
    """Run pages inside app.py's frame (sidebar, engine, URL state), even on a deep link.

    Streamlit keeps a legacy rule: while no script of this process has called st.navigation
    (AppTest: in every run) and a pages/ folder exists, a request for /latents executes
    pages/latents.py directly. Then we run app.py here, in this same script run (so a click
    that started the run is not lost): it calls st.navigation, which opens this page inside
    the frame, and we stop the outer, frameless run.
    """
    if _frame_active():
        return
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).resolve().parent.parent / "app.py"), run_name="__main__")
    st.stop()


PAGES = {"home": "pages/home.py", "latents": "pages/latents.py", "steering": "pages/steering.py"}

DEFAULTS: dict[str, Any] = {
    "prompt": "How do I boil an egg?", "ivs": [], "watch": [], "user_groups": [], "sel_groups": [],
    "seed": 0, "temperature": 0.0, "max_new_tokens": 48, "history": [], "live": None, "latent": None,
    "query": "", "view_run": None, "sel_token": None, "watch_text": "", "abl_groups": [], "truncate": False,
    "meta_on": False, "meta_variant": DEFAULT_META_VARIANT, "repetition_penalty": 1.1, "sampler": "cdf",
    "lab_source": None,
}


def init_state() -> None:
    ss = st.session_state
    for k, v in DEFAULTS.items():
        if k not in ss:
            ss[k] = list(v) if isinstance(v, list) else v
    if not ss.get("_url_loaded"):
        ss["_url_loaded"] = True
        url_state.apply_link(ss, url_state.from_params(st.query_params.to_dict()))


def view_state() -> url_state.ViewState:
    ss = st.session_state
    return url_state.ViewState(
        prompt=ss.prompt, interventions=interventions(), watch=list(ss.watch),
        groups=[g for g in ss.user_groups if g.name in ss.sel_groups], seed=ss.seed,
        temperature=ss.temperature, sampler=ss.sampler, max_new_tokens=ss.max_new_tokens, latent=ss.latent,
        query=ss.query or None,
        model=ss.get("model_in_url"), sae=ss.get("sae_in_url"), read_sae=ss.get("read_in_url"),
        run=ss.get("view_run"),
        recent=[r.id for r in ss.history if r.id != ss.get("view_run") and r.status != "running"])


def sync_url() -> None:
    """Write the shareable state into the URL (only when it changed, to avoid churn)."""
    params = url_state.to_params(view_state())
    if params != st.query_params.to_dict():
        st.query_params.from_dict(params)


def persist(key: str, widget, *args, **kwargs):
    """A widget whose value survives page switches (Streamlit drops widget state off-page)."""
    ss = st.session_state
    wkey = "w_" + key
    if wkey not in ss:
        ss[wkey] = ss[key]
    val = widget(*args, key=wkey, **kwargs)
    ss[key] = val
    return val


def set_persisted(key: str, value) -> None:
    st.session_state[key] = value
    st.session_state.pop("w_" + key, None)


def apply_pending_example(eng) -> None:
    """A Home example or an experiment trial asked for (maybe on another model): applied once
    its model is loaded, and run at once unless it only loads the form."""
    start = bool((st.session_state.get("pending_example") or {}).get("autostart", True))
    if workspace.apply_example(st.session_state, eng.model.name):
        st.session_state.autostart = start


def keep_run(rec) -> None:
    """A finished (or stopped) run: into the history, kept on the server, and shown."""
    ss = st.session_state
    ss.history = [r for r in ss.history if r.id != rec.id] + [rec]
    ss.view_run = rec.id
    ss["_show_run"] = rec.id  # the run picker follows it on the next draw
    try:
        run_store.save(rec)
    except (OSError, BadInput) as exc:  # the run stays in this session even if the disk is full
        st.caption(f"The run could not be kept on the server: {exc}")


def engine():
    """The shared engine, or stop the page with the reason it is not there (still loading, or failed)."""
    ss = st.session_state
    eng = ss.get("engine")
    if eng is None:
        if ss.get("engine_loading"):
            st.info(f"Loading {ss.engine_loading[0]}: the sidebar shows the progress; this page fills in when "
                    "it is ready.")
        else:
            st.error(ss.get("engine_error") or "No model is loaded; choose one in the sidebar.")
        st.stop()
    return eng


def catalog():
    """The steering SAE's catalog (search, latent pages)."""
    return st.session_state.get("catalog")


def read_catalog():
    """The readout SAE's catalog (descriptions of watched and top latents, group heatmaps)."""
    return st.session_state.get("read_catalog", st.session_state.get("catalog"))


def interventions() -> list[Intervention]:
    return [Intervention.from_dict(d) for d in st.session_state.ivs]


def all_groups() -> list[LatentGroup]:
    return list(st.session_state.get("builtin_groups", [])) + list(st.session_state.user_groups)


def group_by_name(name: str) -> LatentGroup | None:
    for g in all_groups():
        if g.name == name:
            return g
    return None


def add_watch(latent: int) -> None:
    ss = st.session_state
    if int(latent) not in ss.watch:
        ss.watch = ss.watch + [int(latent)]
    set_persisted("watch_text", ",".join(str(i) for i in ss.watch))


def add_intervention(iv: Intervention) -> None:
    st.session_state.ivs = st.session_state.ivs + [iv.to_dict()]


def add_to_group(name: str, latent: int, colour: str = "#009E73") -> LatentGroup:
    ss = st.session_state
    groups = list(ss.user_groups)
    for i, g in enumerate(groups):
        if g.name == name:
            if latent not in g.members:
                groups[i] = LatentGroup(name=g.name, members=g.members + [latent], weights=g.weights + [1.0],
                                        colour=g.colour, description=g.description)
            ss.user_groups = groups
            return groups[i]
    g = LatentGroup(name=name, members=[latent], colour=colour)
    ss.user_groups = groups + [g]
    if name not in ss.sel_groups:
        set_persisted("sel_groups", ss.sel_groups + [name])
    return g


def describe(latent: int, steering: bool = False) -> str:
    """A latent's description from the readout catalog (or the steering one, for an intervention's latent)."""
    return description(catalog() if steering else read_catalog(), latent)


def show_url_errors() -> None:
    for e in st.session_state.pop("_url_errors", []) or []:
        st.warning(e)
