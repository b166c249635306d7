"""Steering lab, part: the request form (prompt, interventions, watched latents and groups, sampling)."""

from __future__ import annotations

import streamlit as st

from esr_core.app import engine_loader
from esr_core.app.forms import make_intervention, parse_watch
from esr_core.app.lab_views import BACKTRACK_NAME, CIRCUIT_NAME
from esr_core.app.session import compare_options
from esr_core.errors import BadInput, EsrError
from esr_core.experiments.conditions import META_PROMPTS, meta_text
from esr_core.latents.groups import LatentGroup, groups_from_json, groups_to_json, parse_members
from esr_core.steering.interventions import MODES, POSITIONS, UNITS, Intervention, default_units
from esr_core.viz import palette
from esr_core.viz.lab_html import iv_chip
from pages import _ui

UNIT_HELP = {"norm": "norm: multiples of the median residual norm at the hook, along the unit direction",
             "raw": "raw: the latent's own activation value (the paper's units for add)"}


def interventions_editor(d_sae: int) -> None:
    ss = st.session_state
    st.markdown("**Interventions** (steered run only; the default run gets none)")
    for k, d in enumerate(list(ss.ivs)):
        c1, c2 = st.columns([5, 1])
        iv = Intervention.from_dict(d)
        c1.html(iv_chip(iv.label(), _ui.describe(iv.latent, steering=True)))
        if c2.button("✕", key=f"rm_iv_{k}", help="remove"):
            ss.ivs = [x for j, x in enumerate(ss.ivs) if j != k]
            st.rerun()
    if ss.pop("_clear_iv_latent", False):  # added: the field starts empty again (set before the widget)
        ss["iv_latent"] = ""
    a1, a2, a3 = st.columns([1, 1, 1])
    a1.text_input("Latent id", key="iv_latent", placeholder="e.g. 123")
    mode = a2.selectbox("Mode", MODES, key="iv_mode")
    a3.text_input("Strength", value="0.8", key="iv_strength",
                  help="add and clamp: a value in the chosen units; scale: a factor; ablate: ignored")
    b1, b2 = st.columns(2)
    if mode in ("add", "clamp"):  # the units follow the mode: a clamp value is an activation
        b1.selectbox("Units", UNITS, index=UNITS.index(default_units(mode)), key=f"iv_units_{mode}",
                     help=" · ".join(UNIT_HELP.values()))
    b2.selectbox("Positions", POSITIONS, index=2, key="iv_pos")
    if st.button("Add intervention", key="add_iv", width="stretch"):
        try:
            _ui.add_intervention(pending_intervention(d_sae))
            ss["_clear_iv_latent"] = True
            st.rerun()
        except BadInput as exc:
            st.error(str(exc))


def pending_intervention(d_sae: int) -> Intervention:
    """The intervention the form describes now (validated)."""
    ss = st.session_state
    mode = ss.get("iv_mode", "add")
    units = ss.get(f"iv_units_{mode}", default_units(mode))
    return make_intervention(ss.get("iv_latent", ""), mode, ss.get("iv_strength", "0.8"), units,
                             ss.get("iv_pos", "all"), d_sae)


def add_typed_intervention(d_sae: int) -> bool:
    """On Generate, before the form is drawn: a latent typed but not added yet is added (and said so)."""
    if not str(st.session_state.get("iv_latent", "")).strip():
        return True
    try:
        iv = pending_intervention(d_sae)
    except BadInput as exc:
        st.error(f"The intervention typed in the form: {exc}")
        return False
    _ui.add_intervention(iv)
    st.session_state["iv_latent"] = ""  # called before the form is drawn: the field starts empty
    st.toast(f"Added the typed intervention {iv.label()}")
    return True


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
    _ui.persist("sel_groups", st.multiselect, "Watch groups (lanes)", names)  # full width: names stay readable
    _ui.persist("abl_groups", st.multiselect, "Ablate groups (steered run)", names)
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


def meta_prompt(distractor_label: str) -> str | None:
    """The meta-prompt toggle (the paper's condition, in the lab): the instruction appended to
    the prompt, or None. The judge scores the answer against the prompt without it."""
    on = _ui.persist("meta_on", st.checkbox, "Append a meta-prompt (the paper's condition)",
                     help="An instruction to stay on topic, appended to the prompt for both runs; the verdict judges "
                          "the answer against the prompt without it.")
    if not on:
        return None
    variant = _ui.persist("meta_variant", st.selectbox, "Meta-prompt", list(META_PROMPTS),
                          format_func=lambda v: META_PROMPTS[v].format(label="<the steered latent>"))
    text = meta_text(variant, distractor_label)
    st.caption(f"Sent after the prompt: “{text}”")
    return text


def sampling() -> tuple[int, float, int, float, bool]:
    s1, s2 = st.columns(2)
    s3, s4 = st.columns(2)
    seed = _ui.persist("seed", s1.number_input, "Seed", min_value=0, max_value=2**31 - 1, step=1)
    temperature = _ui.persist("temperature", s2.number_input, "Temperature", min_value=0.0, max_value=2.0, step=0.1)
    max_new = _ui.persist("max_new_tokens", s3.number_input, "Max new tokens", min_value=1, max_value=512, step=8)
    rep = _ui.persist("repetition_penalty", s4.number_input, "Rep. penalty", min_value=1.0, max_value=2.0, step=0.05,
                      help="Repetition penalty (1 = none; the experiments use 1.1)")
    if st.session_state.sampler != "cdf":
        st.caption(f"Sampled tokens are drawn as in the run this came from (`{st.session_state.sampler}` sampler), "
                   "so a seed replays it.")
    keep_end = _ui.persist("truncate", st.checkbox, "Keep the end of a prompt that is too long",
                           help="A prompt over the model's limit loses its beginning instead of failing.")
    return int(seed), float(temperature), int(max_new), float(rep), bool(keep_end)


def compare_model(eng):
    """'Compare with model': a second model that reads the same SAE runs the same steering as a
    third column. Returns its engine once loaded (the load starts when it is chosen), else None."""
    ss = st.session_state
    opts = dict(compare_options(eng.model.name, eng.sae.source))
    if not opts:
        return None
    ss.setdefault("compare_with", "")
    if ss.compare_with and ss.compare_with not in opts:  # a model that cannot be compared here (any more)
        ss.compare_with = ""
        ss.pop("w_compare_with", None)
    name = _ui.persist("compare_with", st.selectbox, "Compare with model (same SAE, same steering)",
                       [""] + list(opts), format_func=lambda n: opts.get(n, "none: steered | default"),
                       help="Runs the same interventions on a second model as a third column: "
                            "steered | second model steered | default.")
    if not name:
        return None
    try:
        other = engine_loader.ready_engine(name, eng.sae.source)
    except EsrError as exc:
        st.error(f"Cannot load {name} for the comparison: {exc}")
        return None
    if other is None:
        st.caption(f"Loading {name} for the comparison… (the third column appears once it is ready)")
    return other
