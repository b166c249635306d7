"""Steering lab: interventions, streamed steered vs default answers, heatmaps, timeline, history.

Generation runs in the script thread and every event is saved into session state as it
arrives; a click on Stop (or on any widget) reruns the script, which stops iterating the
engine's generator, so the computation really stops and the partial run is kept.
"""

import html

import pandas as pd
import streamlit as st

from esr_core.app import services as svc
from esr_core.errors import BadInput, EsrError
from esr_core.steering.interventions import MODES, POSITIONS, UNITS
from esr_core.latents.groups import LatentGroup, groups_from_json, groups_to_json, parse_members
from esr_core.resistance.live import (CIRCUIT_COLOUR, VERDICT_LABELS, LiveResistance, group_threshold,
                                     judged_overlay)
from esr_core.app.run_record import history_to_json, records_from_json
from esr_core.viz.timeline import Series, selected_point, summarise, timeline_figure
from esr_core.viz.token_heatmap import legend_html, render_heatmap, scale_max
from pages import _ui

_ui.require_frame()

ss = st.session_state
st.title("Steering lab")
_ui.show_url_errors()
eng = _ui.engine()
d_sae = eng.sae.d_sae
RUN_COLOURS = {"steered": "#D55E00", "default": "#0072B2"}


CIRCUIT_NAME, BACKTRACK_NAME = "resistance circuit", "backtracking"


def live_html(run: str, text: str, n: int, status: str, badges: str = "") -> str:
    """One streaming answer; ``badges`` is pre-escaped HTML from LiveResistance."""
    return (f'<div class="esr-live" data-run="{run}" data-n="{n}" data-status="{status}" '
            f'style="border:1px solid #ddd;border-radius:6px;padding:8px;min-height:4em">'
            f'<div style="font-size:0.8em;color:#666"><b style="color:{RUN_COLOURS[run]}">{run}</b> · '
            f'<span class="esr-n">{n}</span> tokens · {html.escape(status)}</div>'
            f'<div class="esr-badges" data-run="{run}">{badges}</div>'
            f'<div style="white-space:pre-wrap">{html.escape(text)}</div></div>')


def judged_run(rec) -> dict:
    """Judge each finished answer once per record (offline judge), kept in the session."""
    cache = ss.setdefault("_judged", {})
    if rec.id in cache:
        return cache[rec.id]
    from esr_core.judge.scoring import judge_response

    distractor = next((_ui.describe(iv.latent) for iv in rec.spec.interventions if iv.mode == "add"), None)
    out = {}
    try:
        for run, res in rec.results.items():
            if res.text.strip():
                out[run] = judged_overlay(judge_response(rec.spec.prompt, res.text, distractor), res.pieces)
    except EsrError as exc:
        st.caption(f"Judge unavailable: {exc}")
    cache[rec.id] = out
    return out


left, right = st.columns([2, 3], gap="large")

# ------------------------------------------------------------------ request
with left:
    prompt = _ui.persist("prompt", st.text_area, "Prompt", height=90)
    with st.expander("What the model sees (chat template)"):
        try:
            st.code(eng.render_prompt(prompt or " "), language=None)
        except Exception as exc:
            st.caption(f"Cannot render the template: {exc}")

    st.markdown("**Interventions** (steered run only; the default run gets none)")
    for k, d in enumerate(list(ss.ivs)):
        c1, c2 = st.columns([5, 1])
        from esr_core.steering.interventions import Intervention

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
            _ui.add_intervention(svc.make_intervention(iv_latent, iv_mode, iv_strength, iv_units, iv_pos, d_sae))
            st.rerun()
        except BadInput as exc:
            st.error(str(exc))

    watch_text = _ui.persist("watch_text", st.text_input, "Watched latents (ids, comma-separated)",
                             help="Their activations are read out at every token (steered latents are always watched).")
    try:
        ss.watch = svc.parse_watch(watch_text, d_sae)
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
        gname = st.text_input("Group name", key="grp_name")
        gids = st.text_input("Members (ids, optional weights: 12, 40:0.5)", key="grp_ids")
        gcol = st.color_picker("Colour", "#009E73", key="grp_col")
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

    s1, s2, s3 = st.columns(3)
    seed = _ui.persist("seed", s1.number_input, "Seed", min_value=0, max_value=2**31 - 1, step=1)
    temperature = _ui.persist("temperature", s2.number_input, "Temperature", min_value=0.0, max_value=2.0, step=0.1)
    max_new = _ui.persist("max_new_tokens", s3.number_input, "Max new tokens", min_value=1, max_value=512, step=8)

    c_gen, c_stop = st.columns(2)
    gen = c_gen.button("Generate", type="primary", key="generate", width="stretch")
    stop_slot = c_stop.empty()
    gen = gen or bool(ss.pop("autostart", False))

# ------------------------------------------------------------------ generation
with right:
    live = ss.get("live")
    if live is not None and live.status == "running":
        # the previous script run was interrupted (Stop, or another click): keep what was produced
        rec = live.record("stopped")
        ss.history = ss.history + [rec]
        ss.view_run, ss.live = rec.id, None
        st.info(f"Stopped: kept {live.n_tokens.get('steered', 0)} steered and {live.n_tokens.get('default', 0)} "
                "default tokens.")
    stream_area = st.empty()
    if gen:
        groups = [g for g in map(_ui.group_by_name, ss.sel_groups) if g]
        abl = [g for g in map(_ui.group_by_name, ss.abl_groups) if g]
        spec = None
        try:
            spec = svc.build_spec(prompt, _ui.interventions(), ss.watch, groups, d_sae, seed=int(seed),
                                  temperature=float(temperature), max_new_tokens=int(max_new), ablate_groups=abl)
        except EsrError as exc:
            st.error(str(exc))
        if spec is not None:
            live = svc.LiveRun(spec=spec, model=eng.model.name, sae=eng.sae.source, groups=groups + abl)
            ss.live = live
            stop_slot.button("Stop", key="stop", width="stretch")
            with stream_area.container():
                cols = dict(zip(spec.runs, st.columns(len(spec.runs))))
                slots = {r: cols[r].empty() for r in spec.runs}
                for r in spec.runs:
                    slots[r].html(live_html(r, "", 0, "waiting for the first token…"))
            circuit = next((g for g in groups if g.name == CIRCUIT_NAME), None)
            trackers = {r: (LiveResistance.for_group(circuit) if circuit else
                            LiveResistance(members=[], weights=[], threshold=float("inf"), name="")) for r in spec.runs}
            try:
                for ev in eng.stream(spec):
                    run = live.add(ev)
                    if run in trackers and hasattr(ev, "token_id"):
                        trackers[run].update(ev.acts, ev.text)
                    if run in slots and live.n_tokens.get(run) is not None:
                        status = f"done ({live.done[run]})" if run in live.done else "streaming…"
                        slots[run].html(live_html(run, live.texts.get(run, ""), live.n_tokens[run], status,
                                                  trackers[run].badges_html()))
            except EsrError as exc:
                ss.live = None
                st.error(str(exc))
            else:
                rec = live.record("done")
                live.status = "done"
                ss.history = ss.history + [rec]
                ss.view_run, ss.live, ss.sel_token = rec.id, None, None
                stream_area.empty()
                stop_slot.empty()

    # ------------------------------------------------------------------ results
    recs = {r.id: r for r in ss.history}
    if ss.view_run not in recs and ss.history:
        ss.view_run = ss.history[-1].id
    rec = recs.get(ss.view_run)
    if rec is None:
        st.info("Add an intervention (search the Latents page or type an id), then Generate: the steered and the "
                "default answers stream side by side, then heatmaps and a timeline appear here.")
    else:
        ids = [r.id for r in reversed(ss.history)]
        chosen = st.selectbox("Run", ids, index=ids.index(rec.id), format_func=lambda i: recs[i].label, key="pick_run")
        if chosen != rec.id:
            ss.view_run = chosen
            rec = recs[chosen]
        if rec.status == "stopped":
            st.warning("This run was stopped before the end: partial answers.")
        watched = [i for i in rec.spec.watch]
        group_objs = list(rec.groups)
        opts = [f"latent:{i}" for i in watched] + [f"group:{g.name}" for g in group_objs]

        def fmt(o):
            kind, v = o.split(":", 1)
            return f"#{v} · {_ui.describe(int(v))[:50]}" if kind == "latent" else f"group {v}"

        labels = {o: fmt(o) for o in opts}  # format_func must not read session state (AppTest calls it outside a run)
        h1, h2, h3 = st.columns([3, 1, 1])
        colour_by = h1.selectbox("Colour tokens by", opts, format_func=lambda o: labels.get(o, o),
                                 key="colour_by") if opts else None
        scale = h2.radio("Scale", ["sqrt", "log"], horizontal=True, key="hm_scale")
        with_prompt = h3.checkbox("Prompt tokens", key="hm_prompt")
        latent = group = None
        colour = "#D55E00"
        if colour_by and colour_by.startswith("latent:"):
            latent = int(colour_by.split(":", 1)[1])
        elif colour_by:
            group = next((g for g in group_objs if g.name == colour_by.split(":", 1)[1]), None)
            colour = group.colour if group else colour
        label = fmt(colour_by) if colour_by else ""
        if group is not None and len(group.members) > 1:
            # several latents on one colour: each divided by its own scale, never one shared raw scale
            norm = st.radio("Group colour", ["normalised per latent", "raw sum"], horizontal=True, key="hm_group_norm",
                            help="Normalised: each member ÷ its max activation in the catalog (the max in these runs "
                                 "where the catalog lacks it), then the weighted sum. Raw: the plain weighted sum.")
            same_sae = rec.sae == eng.sae.source
            views, note = svc.group_heatmap_values(rec.results, group, _ui.catalog() if same_sae else None,
                                                   normalise=norm != "raw sum", include_prompt=with_prompt)
            label = f"{label} · {note}"
        else:
            views = {run: svc.token_values(res, latent=latent, group=group, include_prompt=with_prompt)
                     for run, res in rec.results.items()}
        vmax = max([scale_max(v[1], v[2]) for v in views.values()] + [0.0])
        # the selected token, settled before anything draws it (the timeline's identity depends on it)
        if ss.get("tok_run") not in rec.results:
            ss.tok_run = list(rec.results)[0]
        if not 0 <= int(ss.get("tok_idx", 0)) < max(len(rec.results[ss.tok_run].token_ids), 1):
            ss.tok_idx = 0
        sel = (ss.tok_run, int(ss.get("tok_idx", 0)))
        st.html(legend_html(label or "activation", colour, vmax, scale))
        hcols = st.columns(len(views))
        for col, (run, (pieces, vals, special, tops)) in zip(hcols, views.items()):
            res = rec.results[run]
            col.markdown(f"**{run}** · {len(res.token_ids)} tokens · {res.stop_reason or '—'}")
            col.html(render_heatmap(pieces, vals, special=special, tops=tops, label=label, colour=colour,
                                    scale=scale, vmax=vmax or None, describe=_ui.describe, legend=False,
                                    selected=sel[1] if sel and sel[0] == run and not with_prompt else None,
                                    skip_first=with_prompt))

        # resistance as it was while streaming (circuit crossing, restart phrases), kept for the finished run
        circuit_g = next((g for g in group_objs if g.name == CIRCUIT_NAME), None)
        trackers = {}
        if circuit_g is not None:
            rcols = st.columns(len(rec.results))
            for col, (run, res) in zip(rcols, rec.results.items()):
                trackers[run] = tr = LiveResistance.replay(circuit_g, res.pieces, res.acts, res.watch)
                crossing = "" if tr.crossing is None else tr.crossing
                col.html(f'<div class="esr-resistance" data-run="{run}" data-crossing="{crossing}" '
                         f'data-restarts="{",".join(map(str, tr.restart_tokens))}" style="font-size:0.85em">'
                         f'<b>{run}</b> · resistance: '
                         f'{tr.badges_html() or "no circuit crossing, no restart phrase"}</div>')

        # timeline: a line per watched latent (not in a group), a lane per group
        series = []
        in_groups = {m for g in group_objs for m in g.members}
        lines = [i for i in watched if i not in in_groups][:8]
        for run, res in rec.results.items():
            for i in lines:
                p, v, _, _ = svc.token_values(res, latent=i)
                series.append(Series(name=f"#{i}", values=v, run=run, tokens=p))
            for g in group_objs:
                p, v, _, _ = svc.token_values(res, group=g)
                series.append(Series(name=g.name, values=v, run=run, colour=g.colour, lane="groups", tokens=p))
        # resistance: the judge's attempts on the steered answer as shaded regions, restarts as markers
        overlay = judged_run(rec)
        for s_ in series:
            if s_.name == CIRCUIT_NAME:
                s_.threshold = group_threshold(next((g for g in group_objs if g.name == CIRCUIT_NAME), {}))
        if overlay:
            ov = overlay["steered"] if "steered" in overlay else next(iter(overlay.values()))
            scores = " → ".join(f"{x:.0f}" for x in ov["scores"]) or "—"
            st.markdown(f'<div class="esr-verdict" data-verdict="{ov["verdict"]}"><b>Verdict (steered run):</b> '
                        f'{html.escape(ov["label"])} · attempt scores {scores} · '
                        f'offline judge</div>', unsafe_allow_html=True)
            with st.popover("What the rates mean"):
                from esr_core.judge.scoring import RATE_DEFINITIONS

                for k, v in RATE_DEFINITIONS.items():
                    st.markdown(f"**{k}**: {v}")
        if series:
            ov = (overlay or {}).get("steered") or {}
            markers = list(ov.get("markers", ()))
            if trackers.get("steered") is not None and trackers["steered"].crossing is not None:
                markers.append((trackers["steered"].crossing, "circuit crossing", CIRCUIT_COLOUR))
            fig = timeline_figure(series, selected=sel[1] if sel else None,
                                  regions=ov.get("regions", ()), markers=markers,
                                  title="Watched latents over generated tokens (solid = steered, dashed = default)")
            # Streamlit keys a chart's selection to its figure, and the figure marks the selected token:
            # a key per selection gives each selection a fresh chart, so any point reported is a new click
            event = st.plotly_chart(fig, on_select="rerun", selection_mode="points",
                                    key=f"tl_{rec.id}_{sel[0]}_{sel[1]}")
            pt = selected_point(event)
            if pt and pt != sel and pt[0] in rec.results:  # a click on the chart selects that token
                ss.sel_token = pt
                ss.tok_run, ss.tok_idx = pt
                st.rerun()
            rows = []
            for s in series:
                if s.run == "steered":
                    dflt = next((x.values for x in series if x.name == s.name and x.run == "default"), None)
                    sm = summarise(s.values, dflt, threshold=s.threshold)
                    if s.name == CIRCUIT_NAME and trackers.get("steered") is not None:
                        sm["first_crossing"] = trackers["steered"].crossing  # smoothed, like the live badge
                    rows.append({"series": s.name, **sm})
            if rows:
                st.table(pd.DataFrame(rows).set_index("series"))

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
        r = rec.results[trun]
        if r.pieces:
            k = int(tidx)
            tops_k = r.top[k] if k < len(r.top) else []
            # model output: escaped; data-* attributes are the stable hooks the browser test reads
            t2.html(f'<div class="esr-selected-token" data-run="{html.escape(trun)}" data-index="{k}" '
                    f'data-latents="{",".join(str(int(i)) for i, _ in tops_k)}">Top latents at token <b>{k}</b> '
                    f'<code>{html.escape(repr(r.pieces[k]))}</code> of the {html.escape(trun)} run</div>')
            top_rows = [{"latent": i, "value": round(v, 3), "description": _ui.describe(i)} for i, v in tops_k]
            if top_rows:
                t2.table(pd.DataFrame(top_rows).set_index("latent"))
            else:
                t2.caption("No latent is active at this token.")

        d1, d2, d3 = st.columns(3)
        d1.download_button("Download this run (JSON)", rec.to_json(), f"esr-run-{rec.id}.json", "application/json",
                           key="dl_run")
        d2.download_button("Download history (JSON)", history_to_json(ss.history), "esr-history.json",
                           "application/json", key="dl_hist")
        if d3.button("Load into the form", key="reload_spec", help="Same prompt, interventions, seed: same text"):
            spec = rec.spec
            _ui.set_persisted("prompt", spec.prompt)
            ss.ivs = [iv.to_dict() for iv in spec.interventions]
            _ui.set_persisted("seed", int(spec.seed))
            _ui.set_persisted("temperature", float(spec.temperature))
            _ui.set_persisted("max_new_tokens", int(spec.max_new_tokens))
            st.rerun()

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
