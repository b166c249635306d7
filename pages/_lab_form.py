"""Steering lab, part: the request form (prompt, interventions, watched latents and groups, sampling)."""

from __future__ import annotations

import streamlit as st

from esr_core.app.forms import make_intervention, parse_watch
from esr_core.app.lab_views import BACKTRACK_NAME, CIRCUIT_NAME
from esr_core.errors import BadInput
from esr_core.latents.groups import LatentGroup, groups_from_json, groups_to_json, parse_members
from esr_core.steering.interventions import MODES, POSITIONS, UNITS, Intervention
from esr_core.viz import palette
from pages import _ui


def interventions_editor(d_sae: int) -> None:
    ss = st.session_state
    st.markdown("**Interventions** (steered run only; the default run gets none)")
    for k, d in enumerate(list(ss.ivs)):
        c1, c2 = st.columns([5, 1])
        iv = Intervention.from_dict(d)
        c1.markdown(f"`{iv.label()}` · {_ui.describe(iv.latent)}")
        if c2.button("✕", key=f"rm_iv_{k}", help="remove"):
            ss.ivs = [x for j, x in enumerate(ss.ivs) if j != k]
            st.rerun()
    a1, a2, a3 = st.columns([1, 1, 1])
    iv_latent = a1.text_input("Latent id", key="iv_latent", placeholder="e.g. 123")
    iv_mode = a2.selectbox("Mode", MODES, key="iv_mode")
    iv_strength = a3.text_input("Strength", value="0.8", key="iv_strength",
                                help="add/clamp: in units (norm = multiples of the median residual norm); "
                                     "scale: a factor; ablate: ignored")
    b1, b2, b3 = st.columns([1, 1, 1])
    iv_units = b1.selectbox("Units", UNITS, index=1, key="iv_units")
    iv_pos = b2.selectbox("Positions", POSITIONS, index=2, key="iv_pos")
    if b3.button("Add intervention", key="add_iv"):
        try:
            _ui.add_intervention(make_intervention(iv_latent, iv_mode, iv_strength, iv_units, iv_pos, d_sae))
            st.rerun()
        except BadInput as exc:
            st.error(str(exc))


def watch_and_groups(d_sae: int) -> None:
    ss = st.session_state
    watch_text = _ui.persist("watch_text", st.text_input, "Watched latents (ids, comma-separated)",
                             help="Their activations are read out at every token (steered latents are always watched).")
    try:
        ss.watch = parse_watch(watch_text, d_sae)
    except BadInput as exc:
        st.error(f"Watched latents: {exc}")
    names = [g.name for g in _ui.all_groups()]
    if not ss.get("_resistance_watched"):
        # the resistance circuit and the backtracking latents are watched by default: they are the point
        ss._resistance_watched = True
        extra = [n for n in (CIRCUIT_NAME, BACKTRACK_NAME) if n in names and n not in ss.sel_groups]
        if extra:
            _ui.set_persisted("sel_groups", list(ss.sel_groups) + extra)
    ss.sel_groups = [n for n in ss.sel_groups if n in names]
    ss.abl_groups = [n for n in ss.abl_groups if n in names]
    g1, g2 = st.columns(2)
    _ui.persist("sel_groups", g1.multiselect, "Watch groups (lanes)", names)
    _ui.persist("abl_groups", g2.multiselect, "Ablate groups (steered run)", names)
    with st.expander("Latent groups: create, import, export"):
        group_editor(d_sae)


def group_editor(d_sae: int) -> None:
    ss = st.session_state
    gname = st.text_input("Group name", key="grp_name")
    gids = st.text_input("Members (ids, optional weights: 12, 40:0.5)", key="grp_ids")
    gcol = st.color_picker("Colour", palette.GROUP_DEFAULT, key="grp_col")
    if st.button("Create group", key="grp_create"):
        try:
            mem, w = parse_members(gids)
            g = LatentGroup(name=gname, members=mem, weights=w, colour=gcol)
            g.check(d_sae)
            ss.user_groups = [x for x in ss.user_groups if x.name != g.name] + [g]
            _ui.set_persisted("sel_groups", [n for n in ss.sel_groups if n != g.name] + [g.name])
            st.rerun()
        except BadInput as exc:
            st.error(str(exc))
    for g in _ui.all_groups():
        st.caption(f"{'📦 built-in' if g.builtin else '👤'} **{g.name}** · {len(g.members)} latents · "
                   f"{g.description[:80]}")
    if ss.user_groups:
        st.download_button("Export my groups (JSON)", groups_to_json(ss.user_groups), "esr-groups.json",
                           "application/json", key="grp_export")
    up = st.file_uploader("Import groups (JSON)", type=["json"], key="grp_import")
    if up is not None and ss.get("_grp_file") != up.file_id:
        ss._grp_file = up.file_id
        try:
            new = groups_from_json(up.getvalue())
            for g in new:
                g.check(d_sae)
            keep = [x for x in ss.user_groups if x.name not in {g.name for g in new}]
            ss.user_groups = keep + new
            st.success(f"Imported {len(new)} group(s)")
        except BadInput as exc:
            st.error(f"Could not import groups: {exc}")


def sampling() -> tuple[int, float, int]:
    s1, s2, s3 = st.columns(3)
    seed = _ui.persist("seed", s1.number_input, "Seed", min_value=0, max_value=2**31 - 1, step=1)
    temperature = _ui.persist("temperature", s2.number_input, "Temperature", min_value=0.0, max_value=2.0, step=0.1)
    max_new = _ui.persist("max_new_tokens", s3.number_input, "Max new tokens", min_value=1, max_value=512, step=8)
    return int(seed), float(temperature), int(max_new)
