"""Latents: search descriptions (or find what fires on your text) and a per-latent detail page."""

import html

import streamlit as st

from esr_core.app import latent_view as lv
from esr_core.app.forms import parse_latent
from esr_core.app.session import build_catalog
from esr_core.errors import BadInput, EsrError
from esr_core.steering.interventions import Intervention
from esr_core.viz import latent_page as lp
from esr_core.viz.token_heatmap import render_heatmap
from pages import _ui

_ui.require_frame()

ss = st.session_state
st.title("Latents")
_ui.show_url_errors()
eng = _ui.engine()
cat = _ui.catalog()
d_sae = eng.sae.d_sae

if cat is None:
    with st.expander("No latent catalog for this SAE yet: descriptions show 'no description'", expanded=False):
        st.write("The catalog (descriptions, top contexts, histograms) is built from local text in a few minutes "
                 "on this CPU. Latent ids, 'which latents fire on my text' and steering work without it.")
        if st.button("Build the catalog now", key="build_catalog"):
            bar = st.progress(0.0, "starting…")
            try:
                ss.catalog = build_catalog(eng, progress=lambda s: bar.progress(s.fraction, s.text()))
                st.rerun()
            except EsrError as exc:
                st.error(str(exc))


def open_latent(i: int) -> None:
    ss.latent = int(i)
    ss.open_id = str(int(i))


def typed_latent() -> None:
    try:
        ss.latent = parse_latent(ss.open_id, d_sae) if ss.open_id.strip() else None
    except BadInput as exc:
        ss._open_error = str(exc)


search_col, detail_col = st.columns([2, 3], gap="large")

# ------------------------------------------------------------------ search
with search_col:
    mode = st.radio("Find latents", ["by description", "that fire on my text"], horizontal=True, key="search_mode")
    results: list[dict] = []
    if mode == "by description":
        q = _ui.persist("query", st.text_input, "Search descriptions (words, or latent ids like 12 40)",
                        placeholder="e.g. cooking, football, French")
        if q.strip():
            try:
                results = lv.search(cat, q, top=20, d_sae=d_sae)
                if not results:
                    st.info("No latent matches that search.")
            except EsrError as exc:
                st.error(str(exc))
    else:
        text = st.text_area("Your text", key="fire_text", height=80, placeholder="Paste a sentence")
        if st.button("Find latents", key="fire_go") and text.strip():
            try:
                ss.fire_results = lv.firing_on(eng, text, top=20, catalog=cat)
            except EsrError as exc:
                st.error(str(exc))
        results = ss.get("fire_results") or []
    top_act = max([r.get("max_act") or r.get("act") or 0.0 for r in results] + [1e-9])
    for r in results:
        i = int(r["latent"])
        c1, c2 = st.columns([1, 4])
        c1.button(f"#{i}", key=f"res_{i}", on_click=open_latent, args=(i,), width="stretch")
        val = r.get("act") if r.get("act") is not None else r.get("max_act")
        dens = r.get("density")
        bar = ""
        if val is not None:
            w = int(100 * min(float(val) / top_act, 1.0))
            bar = (f'<span style="display:inline-block;width:60px;height:8px;background:#eee;margin-left:6px">'
                   f'<span style="display:block;width:{w}%;height:8px;background:#D55E00"></span></span>')
        facts = []
        if dens is not None:
            facts.append(f"density {dens:.2%}")
        if val is not None:
            facts.append(f"{'act' if r.get('act') is not None else 'max'} {float(val):.3g}")
        if r.get("token"):
            facts.append(f"on {html.escape(repr(r['token']))}")
        c2.html(f'<div class="esr-result" data-latent="{i}" style="font-size:0.9em">'
                f'{html.escape(r.get("description") or lv.NO_DESCRIPTION)}<br>'
                f'<span style="color:#777;font-size:0.85em">{" · ".join(facts)}</span>{bar}</div>')

# ------------------------------------------------------------------ detail
with detail_col:
    if "open_id" not in ss:  # widget state is dropped off-page: start from the open latent
        ss.open_id = "" if ss.latent is None else str(ss.latent)
    st.text_input("Open latent id", key="open_id", on_change=typed_latent)
    if ss.get("_open_error"):
        st.error(ss.pop("_open_error"))
    if ss.latent is None:
        st.info("Search for a latent on the left, or type an id, to open its page.")
        st.stop()
    try:
        lat = parse_latent(ss.latent, d_sae)
    except BadInput as exc:
        st.error(str(exc))
        ss.latent = None
        st.stop()
    e = lv.latent_entry(eng, cat, lat)
    st.subheader(f"Latent #{lat}")
    st.markdown(f"**{e.get('description') or lv.NO_DESCRIPTION}**"
                + (" · *dead (never fired on the catalog text)*" if e.get("dead") else ""))
    facts = []
    if e.get("density") is not None:
        facts.append(f"density {e['density']:.3%}")
    if e.get("max_act") is not None:
        facts.append(f"max activation {e['max_act']:.3g}")
    if e.get("description_source"):
        facts.append(f"description: {e['description_source']}")
    st.caption(" · ".join(facts) or "No catalog statistics for this SAE.")

    b1, b2, b3 = st.columns(3)
    strength = float(ss.get("iv_strength_default", 0.8))
    if b1.button("Steer with this", key="steer_this", type="primary"):
        _ui.add_intervention(Intervention(latent=lat, mode="add", strength=strength, units="norm", positions="all"))
        _ui.add_watch(lat)
        st.switch_page("pages/steering.py")
    if b2.button("Watch this", key="watch_this"):
        _ui.add_watch(lat)
        st.toast(f"Watching #{lat}")
    with b3.popover("Add to group"):
        gname = st.text_input("Group", value="my group", key="grp_target")
        if st.button("Add", key="grp_add"):
            try:
                g = _ui.add_to_group(gname, lat)
                st.toast(f"#{lat} is in '{g.name}' ({len(g.members)} latents)")
            except BadInput as exc:
                st.error(str(exc))

    test = st.text_input("Test your text", key="test_text", placeholder="Type a sentence to see this latent on it")
    marker = None
    if test.strip():
        try:
            ta = lv.text_activation(eng, test, lat)
            marker = ta["max"]
            st.html(render_heatmap(ta["tokens"], ta["values"], label=f"#{lat}", colour="#D55E00",
                                   vmax=e.get("max_act") or None))
            st.caption(f"Max on your text: {ta['max']:.3g} (position 0 excluded)")
        except EsrError as exc:
            st.error(str(exc))

    st.plotly_chart(lp.histogram_figure(e.get("histogram"), e.get("max_act"), marker), key=f"hist_{lat}")

    st.markdown("**Effect on the next token**")
    st.caption(lv.logit_method(cat, e))
    p1, p2 = st.columns(2)
    p1.markdown("Promoted")
    p1.html(lp.token_effects_html(e.get("promoted", []), "promoted", unit=lv.logit_unit(e)))
    p2.markdown("Suppressed")
    p2.html(lp.token_effects_html(e.get("suppressed", []), "suppressed", unit=lv.logit_unit(e)))

    ctx = (e.get("contexts") or {})
    top_contexts = list(ctx.get("text") or []) + list(ctx.get("chat") or [])
    st.markdown("**Top activating contexts**")
    if not top_contexts:
        st.caption("No contexts without a catalog.")
    else:
        st.caption("Each line starts with the peak activation (the outlined token) and its share of the maximum.")
        st.html(lp.contexts_html(top_contexts, lat, e.get("max_act")))
    for band in e.get("bands") or []:
        st.markdown(f"**Sampled from {band['label']}**")
        st.html(lp.contexts_html(band["contexts"], lat, e.get("max_act"), n=3))
    if cat is not None and not e.get("bands"):
        st.caption("This catalog has no samples from lower activation bands yet: "
                   "`esr-lab catalog refresh --what bands` adds them.")

    st.markdown("**Nearest latents** (decoder cosine, most similar first)")
    nb = sorted(e.get("neighbours") or [], key=lambda n: -n["cosine"])[:8]
    st.html(lp.neighbours_html(nb, describe=(lambda j: lv.description(cat, j)) if cat is not None else None))
    ncols = st.columns(4)
    for k, n in enumerate(nb):
        ncols[k % 4].button(f"open #{n['latent']}", key=f"nb_{n['latent']}", on_click=open_latent, args=(n["latent"],),
                            width="stretch")
