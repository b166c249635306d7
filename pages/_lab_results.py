"""Steering lab, part: a finished run (heatmaps, resistance, timeline, selected token, downloads)."""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st

from esr_core.app import lab_views, workspace
from esr_core.app.live_run import group_heatmap_values, token_values
from esr_core.app.run_record import history_to_json, records_from_json
from esr_core.errors import BadInput
from esr_core.judge.scoring import RATE_DEFINITIONS
from esr_core.viz import palette
from esr_core.viz.lab_html import resistance_line, run_view, selected_token, verdict_line
from esr_core.viz.timeline import selected_point, timeline_figure
from esr_core.viz.token_heatmap import legend_html, render_heatmap, scale_max
from pages import _ui


def judged(rec) -> dict:
    """Judge each finished answer once per record (offline judge), kept in the session."""
    cache = st.session_state.setdefault("_judged", {})
    if rec.id not in cache:
        out, err = lab_views.judge_runs(rec, lambda i: _ui.describe(i, steering=True))
        if err:
            st.caption(err)
        cache[rec.id] = out
    return cache[rec.id]


def heatmaps(rec, eng, sel) -> None:
    opts = [f"latent:{i}" for i in rec.spec.watch] + [f"group:{g.name}" for g in rec.groups]

    def fmt(o):
        kind, v = o.split(":", 1)
        return f"#{v} · {_ui.describe(int(v))[:50]}" if kind == "latent" else f"group {v}"

    labels = {o: fmt(o) for o in opts}  # format_func must not read session state (AppTest calls it outside a run)
    colour_by = st.selectbox("Colour tokens by", opts, format_func=lambda o: labels.get(o, o),
                             key="colour_by") if opts else None
    h2, h3 = st.columns(2)
    scale = h2.radio("Scale", ["sqrt", "log"], horizontal=True, key="hm_scale")
    with_prompt = h3.checkbox("Show the prompt's tokens", key="hm_prompt")
    latent = group = None
    colour = palette.CIRCUIT
    if colour_by and colour_by.startswith("latent:"):
        latent = int(colour_by.split(":", 1)[1])
    elif colour_by:
        group = next((g for g in rec.groups if g.name == colour_by.split(":", 1)[1]), None)
        colour = group.colour if group else colour
    label = fmt(colour_by) if colour_by else ""
    if group is not None and len(group.members) > 1:
        # several latents on one colour: each divided by its own scale, never one shared raw scale
        norm = st.radio("Group colour", ["normalised per latent", "raw sum"], horizontal=True, key="hm_group_norm",
                        help="Normalised: each member ÷ its max activation in the catalog (the max in these runs "
                             "where the catalog lacks it), then the weighted sum. Raw: the plain weighted sum.")
        same_sae = rec.sae == eng.sae.source
        views, note = group_heatmap_values(rec.results, group, _ui.read_catalog() if same_sae else None,
                                           normalise=norm != "raw sum", include_prompt=with_prompt)
        label = f"{label} · {note}"
    else:
        views = {run: token_values(res, latent=latent, group=group, include_prompt=with_prompt)
                 for run, res in rec.results.items()}
    vmax = max([scale_max(v[1], v[2]) for v in views.values()] + [0.0])
    st.html(legend_html(label or "activation", colour, vmax, scale))
    for col, (run, (pieces, vals, special, tops)) in zip(st.columns(len(views)), views.items()):
        res = rec.results[run]
        col.markdown(f"**{rec.run_title(run)}** · {len(res.token_ids)} tokens · {res.stop_reason or '—'}")
        col.html(render_heatmap(pieces, vals, special=special, tops=tops, label=label, colour=colour,
                                scale=scale, vmax=vmax or None, describe=_ui.describe, legend=False,
                                selected=sel[1] if sel and sel[0] == run and not with_prompt else None,
                                skip_first=with_prompt))


def timeline(rec, sel, trackers) -> None:
    ss = st.session_state
    series = lab_views.timeline_series(rec)
    overlay = judged(rec)
    if overlay:
        shown = [r for r in ("steered", "compare") if r in overlay] or [next(iter(overlay))]
        for run in shown:  # a verdict per steered column (the second model's too)
            ov = overlay[run]
            st.markdown(verdict_line(ov["verdict"], ov["label"], ov["scores"], run=rec.run_title(run)),
                        unsafe_allow_html=True)
        with st.popover("What the rates mean"):
            for k, v in RATE_DEFINITIONS.items():
                st.markdown(f"**{k}**: {v}")
    if not series:
        return
    ov = (overlay or {}).get("steered") or {}
    markers = list(ov.get("markers", ()))
    if trackers.get("steered") is not None and trackers["steered"].crossing is not None:
        markers.append((trackers["steered"].crossing, "circuit crossing", palette.CIRCUIT))
    fig = timeline_figure(series, selected=sel[1] if sel else None, regions=ov.get("regions", ()), markers=markers,
                          title="Watched latents over generated tokens (solid = steered, dashed = default"
                                + (f", dash-dot = {rec.compare_model} steered)" if rec.compare_model else ")"))
    # Streamlit keys a chart's selection to its figure, and the figure marks the selected token:
    # a key per selection gives each selection a fresh chart, so any point reported is a new click
    event = st.plotly_chart(fig, on_select="rerun", selection_mode="points", key=f"tl_{rec.id}_{sel[0]}_{sel[1]}")
    pt = selected_point(event)
    if pt and pt != sel and pt[0] in rec.results:  # a click on the chart selects that token
        ss.sel_token = pt
        ss.tok_run, ss.tok_idx = pt
        st.rerun()
    rows = lab_views.summary_rows(series, trackers)
    if rows:
        st.table(pd.DataFrame(rows).set_index("series"))


def token_panel(rec) -> None:
    ss = st.session_state
    t1, t2 = st.columns([1, 2])
    runs = list(rec.results)
    if ss.get("tok_run") not in runs:
        ss.tok_run = runs[0]
    trun = t1.selectbox("Token of run", runs, key="tok_run")
    n_tok = max(len(rec.results[trun].token_ids), 1)
    if not 0 <= int(ss.get("tok_idx", 0)) < n_tok:
        ss.tok_idx = 0
    tidx = t1.number_input("Token index", 0, n_tok - 1, key="tok_idx")
    ss.sel_token = (trun, int(tidx))
    piece, rows = lab_views.top_latents_at(rec, trun, int(tidx), _ui.describe)
    if rec.results[trun].pieces:
        t2.html(selected_token(trun, int(tidx), piece, [r["latent"] for r in rows]))
        if rows:
            t2.table(pd.DataFrame(rows).set_index("latent"))
        else:
            t2.caption("No latent is active at this token.")


def downloads(rec) -> None:
    ss = st.session_state
    d1, d2, d3 = st.columns(3)
    d1.download_button("Download this run (JSON)", rec.to_json(), f"esr-run-{rec.id}.json", "application/json",
                       key="dl_run")
    d2.download_button("Download history (JSON)", history_to_json(ss.history), "esr-history.json",
                       "application/json", key="dl_hist")
    if d3.button("Load into the form", key="reload_spec", help="Same prompt, interventions, seed: same text"):
        ss.pending_example = dict(workspace.setup_from_spec(rec.spec, rec.model), autostart=False)
        st.rerun()


def compact_view(rec, eng, key: str) -> None:
    """A finished run without the lab's controls: the circuit heatmap, the verdict and the
    timeline with the judge's regions (the Resistance page's one-click conditions)."""
    circuit = lab_views.circuit_of(list(rec.groups))
    res = rec.results.get("steered") or next(iter(rec.results.values()))
    if circuit is not None:
        views, note = group_heatmap_values(rec.results, circuit, _ui.read_catalog(), normalise=True)
        pieces, vals, special, tops = views.get("steered") or next(iter(views.values()))
        st.html(render_heatmap(pieces, vals, special=special, tops=tops, label=f"{circuit.name} · {note}",
                               colour=circuit.colour, describe=_ui.describe))
    else:
        st.markdown(f"<div style='white-space:pre-wrap'>{html.escape(res.text)}</div>", unsafe_allow_html=True)
    overlay = judged(rec).get("steered") or {}
    if overlay:
        st.markdown(verdict_line(overlay["verdict"], overlay["label"], overlay["scores"]), unsafe_allow_html=True)
    series = lab_views.timeline_series(rec)
    trackers = lab_views.resistance_trackers(rec)
    markers = list(overlay.get("markers", ()))
    if trackers.get("steered") is not None and trackers["steered"].crossing is not None:
        markers.append((trackers["steered"].crossing, "circuit crossing", palette.CIRCUIT))
    if series:
        st.plotly_chart(timeline_figure(series, regions=overlay.get("regions", ()), markers=markers,
                                        title="Watched latents over generated tokens"), key=f"tl_{key}_{rec.id}")


def show_record(rec, eng) -> None:
    ss = st.session_state
    steered = rec.results.get("steered") or next(iter(rec.results.values()))
    st.html(run_view(rec.id, rec.spec.prompt, rec.model, len(steered.token_ids), rec.status,
                     bool(rec.spec.interventions)))
    if rec.status == "stopped":
        st.warning("This run was stopped before the end: partial answers.")
    # the selected token, settled before anything draws it (the timeline's identity depends on it)
    if ss.get("tok_run") not in rec.results:
        ss.tok_run = list(rec.results)[0]
    if not 0 <= int(ss.get("tok_idx", 0)) < max(len(rec.results[ss.tok_run].token_ids), 1):
        ss.tok_idx = 0
    sel = (ss.tok_run, int(ss.get("tok_idx", 0)))
    heatmaps(rec, eng, sel)
    # resistance as it was while streaming (circuit crossing, restart phrases), kept for the finished run
    trackers = lab_views.resistance_trackers(rec)
    if trackers:
        for col, (run, tr) in zip(st.columns(len(trackers)), trackers.items()):
            col.html(resistance_line(run, tr.crossing, tr.restart_tokens, tr.badges_html()))
    timeline(rec, sel, trackers)
    token_panel(rec)
    downloads(rec)


def open_records_widgets() -> None:
    ss = st.session_state

    def open_records(data, name: str) -> None:
        try:
            new = records_from_json(data)
        except BadInput as exc:
            st.error(f"Could not open {name}: {exc}")
            return
        ss.history = ss.history + new
        ss.view_run, ss.sel_token = new[-1].id, None
        st.rerun()

    up = st.file_uploader("Open a run or history JSON", type=["json"], key="run_upload")
    if up is not None and ss.get("_run_file") != up.file_id:
        ss._run_file = up.file_id
        open_records(up.getvalue(), up.name)
    with st.expander("…or paste a run JSON"):
        pasted = st.text_area("Run JSON", key="run_paste", height=80)
        if st.button("Open pasted JSON", key="run_paste_open"):
            open_records(pasted, "the pasted text")
