"""Steering lab: interventions, streamed steered vs default answers, heatmaps, timeline, history.

Generation runs in the script thread and every event is saved into session state as it
arrives; a click on Stop (or on any widget) reruns the script, which stops iterating the
engine's generator, so the computation really stops and the partial run is kept.
"""

import streamlit as st

from esr_core.app import workspace
from esr_core.app.forms import build_spec
from esr_core.app.lab_views import circuit_of
from esr_core.app.live_run import LiveRun
from esr_core.errors import EsrError
from esr_core.resistance.live import LiveResistance
from esr_core.steering.compare import stream_two
from esr_core.steering.spec import COMPARE_RUN, RECORD_RUNS
from esr_core.viz.lab_html import HIDE_STREAMLIT_STOP, live_card
from pages import _lab_form, _lab_results, _ui

_ui.require_frame()

ss = st.session_state
st.title("Steering lab")
_ui.show_url_errors()
eng = _ui.engine()
d_sae = eng.sae.d_sae
st.html(HIDE_STREAMLIT_STOP)  # one Stop button: the lab's own (it keeps what was streamed)
_ui.apply_pending_example(eng)
# Generate was clicked (its state is known before the form is drawn): a latent typed in the form
# but not added yet is added first, so the chip shows it and the run uses it
typed_ok = _lab_form.add_typed_intervention(d_sae) if ss.get("generate") else True

left, right = st.columns([2, 3], gap="large")

# ------------------------------------------------------------------ request
with left:
    prompt = _ui.persist("prompt", st.text_area, "Prompt", height=90)
    meta = _lab_form.meta_prompt(next((_ui.describe(iv.latent) for iv in _ui.interventions() if iv.mode == "add"), ""))
    with st.expander("What the model sees (chat template)"):
        try:
            sent = f"{(prompt or ' ').rstrip()} {meta}" if meta else (prompt or " ")
            st.code(eng.render_prompt(sent), language=None)
        except EsrError as exc:
            st.caption(f"Cannot render the template: {exc}")
    if ss.get("lab_source"):
        st.caption(f"Set up from {ss.lab_source}: same prompt, interventions, meta-prompt and seed.")
    _lab_form.interventions_editor(d_sae)
    _lab_form.watch_and_groups(d_sae)
    seed, temperature, max_new, rep_penalty, keep_end = _lab_form.sampling()
    other = _lab_form.compare_model(eng)
    c_gen, c_stop = st.columns(2)
    gen = c_gen.button("Generate", type="primary", key="generate", width="stretch")
    stop_slot = c_stop.empty()
    gen = gen or bool(ss.pop("autostart", False))


def stream(spec) -> None:
    """Stream both answers into cards, with the circuit and restart badges; keep the record.

    Whatever ends the stream (its end, the lab's Stop, any other click, Streamlit stopping the
    script), the tokens already streamed stay in ``ss.live``; the next run files them as a
    stopped run (see :func:`file_interrupted_run`). Nothing here may touch session state once
    the stream is interrupted: Streamlit re-raises its stop on every access.
    """
    groups = [g for g in map(_ui.group_by_name, ss.sel_groups) if g]
    abl = [g for g in map(_ui.group_by_name, ss.abl_groups) if g]
    live = LiveRun(spec=spec, model=eng.model.name, sae=eng.sae.source, read_sae=ss.get("engine_read_sae"),
                   dtype=getattr(eng.model, "dtype", "float32"),
                   groups=groups + abl, compare_model=other.model.name if other is not None else "")
    ss.live = live
    _stream_into_cards(spec, live, groups)


def file_interrupted_run() -> None:
    """A stream the previous script run did not finish (Stop, another click, a stopped script)."""
    live = ss.get("live")
    rec = live.end("stopped") if live is not None else None
    if rec is not None:  # closed first: a token the old script run still makes is not added
        _ui.keep_run(rec)
        ss.live = None
        kept = {run: len(res.token_ids) for run, res in rec.results.items()}
        st.info(f"Stopped: kept {kept.get('steered', 0)} steered and {kept.get('default', 0)} default tokens.")


def _stream_into_cards(spec, live, groups) -> None:
    stop_slot.button("Stop", key="stop", width="stretch")
    runs = [r for r in RECORD_RUNS if r in spec.runs or (r == COMPARE_RUN and live.compare_model)]
    titles = {r: (f"steered · {live.compare_model}" if r == COMPARE_RUN else
                  f"{r} · {live.model}" if live.compare_model else r) for r in runs}
    with stream_area.container():
        cols = dict(zip(runs, st.columns(len(runs))))
        slots = {r: cols[r].empty() for r in runs}
        for r in runs:
            slots[r].html(live_card(r, "", 0, "waiting for the first token…", title=titles[r]))
    circuit = circuit_of(groups)
    trackers = {r: (LiveResistance.for_group(circuit) if circuit else
                    LiveResistance(members=[], weights=[], threshold=float("inf"), name="")) for r in runs}
    events = stream_two(eng, other, spec) if live.compare_model else eng.stream(spec)
    try:
        for ev in events:
            run = live.add(ev)
            if run in trackers and hasattr(ev, "token_id"):
                trackers[run].update(ev.acts, ev.text)
            if run in slots and live.n_tokens.get(run) is not None:
                status = f"done ({live.done[run]})" if run in live.done else "streaming…"
                slots[run].html(live_card(run, live.texts.get(run, ""), live.n_tokens[run], status,
                                          trackers[run].badges_html(), title=titles[run]))
    except EsrError as exc:
        live.end("failed")
        ss.live = None
        st.error(str(exc))
        return
    rec = live.end("done")
    if rec is None:  # stopped meanwhile: the next script run filed it
        return
    _ui.keep_run(rec)
    ss.live, ss.sel_token = None, None
    stream_area.empty()
    stop_slot.empty()


# ------------------------------------------------------------------ generation and results
with right:
    file_interrupted_run()
    stream_area = st.empty()
    if gen and typed_ok:
        groups = [g for g in map(_ui.group_by_name, ss.sel_groups) if g]
        abl = [g for g in map(_ui.group_by_name, ss.abl_groups) if g]
        try:
            spec = build_spec(prompt, _ui.interventions(), ss.watch, groups, d_sae, seed=seed,
                              temperature=temperature, max_new_tokens=max_new, ablate_groups=abl,
                              repetition_penalty=rep_penalty, truncate="keep_end" if keep_end else "error",
                              meta_prompt=meta, sampler=ss.sampler)
            eng.prompt_tokens(spec)  # a prompt over the limit fails here, before any card is drawn
        except EsrError as exc:
            st.error(str(exc))
        else:
            stream(spec)

    mine, others = workspace.runs_for(ss.history, eng.model.name, eng.sae.source)
    if others:
        st.caption(f"{others} run{'s' if others > 1 else ''} made with another model or SAE: switch back to see "
                   f"{'them' if others > 1 else 'it'}.")
    recs = {r.id: r for r in mine}
    if ss.view_run not in recs and mine:
        ss.view_run = mine[-1].id
    rec = recs.get(ss.view_run)
    if rec is None:
        st.info("Press Generate: the steered and the default answers stream side by side, then heatmaps and a "
                "timeline appear here." if ss.ivs else
                "Add an intervention (search the Latents page or type an id), then Generate: the steered and the "
                "default answers stream side by side, then heatmaps and a timeline appear here.")
    else:
        ids = [r.id for r in reversed(mine)]
        if ss.pop("_show_run", None) in ids or ss.get("pick_run") not in ids:
            ss.pick_run = rec.id  # the newest run is the one shown (set before the widget is drawn)
        chosen = st.selectbox("Run", ids, format_func=lambda i: recs[i].label, key="pick_run")
        if chosen != rec.id:
            ss.view_run = chosen
            rec = recs[chosen]
        _lab_results.show_record(rec, eng)
    _lab_results.open_records_widgets()
