"""Resistance: the off-topic detector circuit, one-click conditions, and a token-by-token replay.

Thin page: everything it computes comes from esr_core.resistance, esr_core.latents.groups and
esr_core.experiments.conditions (arXiv 2602.06941, sec. on off-topic detectors and the per-token view).
"""

import html

import pandas as pd
import streamlit as st

from esr_core.app import workspace
from esr_core.app.live_run import normalised_member_series
from esr_core.app.run_record import RunRecord
from esr_core.app.session import example_norm_strength, load_examples
from esr_core.errors import EsrError
from esr_core.experiments.conditions import BASE_CONDITIONS, CONDITIONS, build_conditions
from esr_core.latents.groups import LatentGroup, group_for, shipped_group
from esr_core.resistance import view as rv
from esr_core.resistance.signals import ema
from esr_core.resistance.token_report import evidence_rows, separation_line
from esr_core.steering.interventions import Intervention
from esr_core.steering.spec import GenerationSpec
from esr_core.viz import palette
from esr_core.viz.timeline import Marker, Region, Series, timeline_figure
from esr_core.viz.token_heatmap import render_heatmap
from pages import _lab_results, _ui

_ui.require_frame()
ss = st.session_state
st.title("Resistance")
st.caption("Off-topic detector latents (the \"resistance circuit\"), backtracking latents, and how they behave "
           "when a model drifts and corrects itself. Method: arXiv 2602.06941.")
eng = _ui.engine()
d_sae = eng.sae.d_sae

EXAMPLE_PROMPT = "Explain how to clean a cast iron pan after cooking."
EXAMPLE_RESPONSE = (
    "Let the pan cool for a few minutes, then rinse it under hot water. Dogs are loyal companions, and a golden "
    "retriever will happily fetch a ball in the park for hours while puppies need plenty of sleep. "
    "Wait, that's not right. Let me get back to your question. To clean a cast iron pan, scrub away stuck food "
    "with a stiff brush and a little coarse salt, rinse, dry it completely on the stove, and rub a thin layer of "
    "oil into the surface before storing it.")


def _describe(group: LatentGroup, i: int) -> str:
    return group.member_descriptions.get(str(i)) or _ui.describe(i)


def _open_in_lab(rec) -> None:
    ss.pending_example = workspace.setup_from_spec(rec.spec, rec.model, source="the Resistance page's one-click "
                                                   "conditions")
    ss["_go_lab"] = True


if ss.pop("_go_lab", False):
    st.switch_page("pages/steering.py")

circuit = group_for(eng, "circuit")
backtrack = group_for(eng, "backtracking")

# ------------------------------------------------------------------ the groups
st.subheader("Latent groups")
shipped = shipped_group("circuit", eng.model.name)
if circuit is None:
    if shipped is not None:
        st.warning("No resistance circuit for this model and SAE: the shipped one was found on another model/SAE "
                   "and does not apply here. Find one for this SAE with `esr-lab detectors find --model ... --sae ...`.")
    else:
        st.info("No resistance circuit for this model and SAE yet: run `esr-lab detectors find` (it ships for the "
                "default model and SAE).")
tabs = st.tabs(["Resistance circuit", "Backtracking"])
for tab, g, name in ((tabs[0], circuit, "circuit"), (tabs[1], backtrack, "backtracking")):
    with tab:
        if g is None:
            st.caption(f"No {name} group for this model and SAE.")
            continue
        st.markdown(f"<span style='color:{html.escape(g.colour)}'>■</span> **{html.escape(g.name)}** "
                    f"· {len(g.members)} latents", unsafe_allow_html=True)
        st.caption(g.description)
        rows = g.table()
        for r in rows:
            r["description"] = r.get("description") or _describe(g, r["latent"])
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key=f"tbl_{name}")
        s = g.extra.get("summary") or {}
        if name == "circuit" and g.extra.get("evidence"):
            ev = g.extra["evidence"]
            st.markdown("**Evidence and controls** (measured on held-out prompts; `esr-lab detectors token-search`)")
            st.dataframe(pd.DataFrame(evidence_rows(g.extra)), hide_index=True, width="stretch", key="tbl_evidence")
            if ev.get("separation"):
                st.markdown(separation_line(ev["separation"]))
            rej = ", ".join(f"{why}: {n}" for why, n in (ev.get("rejected") or {}).items())
            st.caption(f"{ev.get('n_passing')} of {ev.get('n_candidates')} candidate latents passed every control "
                       f"(rejected: {rej or 'none'}). Per member: AUC, the AUC within tokens of the same id and "
                       f"within the same distance from a segment start, the AUC of garbled vs clean text, the "
                       f"system-prompt ratio and, read live, the AUC of on-topic text under the steering alone. "
                       f"Alert threshold {(g.threshold or {}).get('value')}: {(g.threshold or {}).get('basis', '')}.")
            if g.extra.get("layers"):
                st.markdown("**Per layer** (each layer's best group, the same held-out tokens)")
                st.dataframe(pd.DataFrame(g.extra["layers"]), hide_index=True, width="stretch", key="tbl_layers")
            if (ev.get("live") or {}).get("layers"):
                st.markdown("**Per layer, drifts read live** (their steering on; distractors held out with their "
                            f"prompts; `{ev['live'].get('report')}`)")
                st.dataframe(pd.DataFrame(ev["live"]["layers"]), hide_index=True, width="stretch",
                             key="tbl_layers_live")
            if any(r.get("report") for r in (ev.get("live") or {}).get("layers") or g.extra.get("layers") or []):
                st.caption("A row that names its own report and SAE was searched later on the same inputs and "
                           "held-out split (`esr-lab detectors annotate --add-layers`); an SAE under `~/.cache` is "
                           "not shipped: docs/RESISTANCE.md gives the command that trains it.")
        elif name == "circuit" and s:
            thr = g.threshold or {}
            params = g.extra.get("params") or {}
            st.caption(f"Rule {params.get('rule')} (AUC threshold used {params.get('threshold_used')}); "
                       f"{s.get('n_on')} on-topic vs {s.get('n_off')} off-topic pairs; held-out AUC mean "
                       f"{s.get('mean_auc_heldout')}, min {s.get('min_auc_heldout')}; alert threshold "
                       f"{thr.get('value')} ({thr.get('basis', '')}).")

# ------------------------------------------------------------------ conditions
st.subheader("One click per condition")
st.caption("Same prompt, seed and sampling for every condition; only the edit differs. A 135M model rarely "
           "corrects itself (the paper finds ESR only at 70B scale): expect restarts mainly with the meta-prompt.")
c1, c2, c3, c4 = st.columns([3, 1, 1, 1])
cprompt = c1.text_input("Prompt", value=EXAMPLE_PROMPT, key="res_prompt")
ex = load_examples(model=eng.model.name)
dlat = c2.number_input("Distractor latent", min_value=0, max_value=d_sae - 1,
                       value=min(int(ex[0]["latent"]), d_sae - 1) if ex else 0,
                       key=f"res_dlat_{ss.get('workspace_key')}")  # per SAE: ranges differ
dstr = c3.number_input("Strength (× median norm)", step=1.0, key="res_dstr",
                       value=example_norm_strength(ex[0], float(eng.median_norm)) if ex else 8.0)
ntok = c4.number_input("New tokens", min_value=4, max_value=256, value=48, key="res_ntok")
seed = st.number_input("Seed", min_value=0, value=0, key="res_seed")
distractor = Intervention(latent=int(dlat), mode="add", strength=float(dstr), units="norm", positions="all")
watch = sorted(set((circuit.members if circuit else []) + (backtrack.members if backtrack else []) + [int(dlat)]))
base = GenerationSpec(prompt=cprompt or " ", watch=watch, max_new_tokens=int(ntok), seed=int(seed),
                      temperature=0.6, repetition_penalty=1.1, top_k=0)
ablatable = circuit is not None and circuit.matches(eng, steering=True)  # ablation edits the steering SAE's code
avail = [k for k in BASE_CONDITIONS if ablatable or not CONDITIONS[k].ablates]
if circuit is not None and not ablatable:
    st.caption("The circuit lives on the readout SAE, not the steering SAE: ablating it needs an edit at the "
               "readout hook, which the one-click conditions do not make; the ablation conditions are left out.")
cols = st.columns(3) + st.columns(3)  # two rows: every label fits
res_store = ss.setdefault("res_conditions", {})
groups = [g for g in (circuit, backtrack) if g is not None]
for col, key in zip(cols, avail):
    if col.button(CONDITIONS[key].label, key=f"cond_{key}"):
        try:
            cond = build_conditions(base, distractor, circuit, d_sae, keys=[key])[0]
            with st.spinner(f"Running {cond.label}…"):
                results = eng.generate(cond.spec)
            res_store[key] = {"note": cond.note, "rec": RunRecord(spec=cond.spec, model=eng.model.name, read_sae=ss.get("engine_read_sae"),
                                                                   sae=eng.sae.source, results=results, groups=groups)}
        except EsrError as exc:
            st.error(str(exc))
for key in [k for k in BASE_CONDITIONS if k in res_store]:
    rec = res_store[key]["rec"]
    if rec.model != eng.model.name or rec.sae != eng.sae.source:
        continue  # made with another model or SAE: its latent ids mean nothing here
    with st.expander(f"{CONDITIONS[key].label} · {len(rec.results['steered'].token_ids)} tokens", expanded=True):
        st.caption(res_store[key]["note"] or "")
        _lab_results.compact_view(rec, eng, key=f"cond_{key}")
        st.button("Open in the steering lab", key=f"cond_lab_{key}", on_click=_open_in_lab, args=(rec,))

# ------------------------------------------------------------------ replay
st.subheader("Replay a transcript")
st.caption("Paste or upload any prompt + response (e.g. a recovery produced by a large model elsewhere) and see "
           "this model's circuit and backtracking latents over it, token by token, with regions found by the judge.")
rp = st.text_input("Prompt", value=EXAMPLE_PROMPT, key="rep_prompt")
up = st.file_uploader("…or upload the response (.txt)", type=["txt"], key="rep_file")
rr = st.text_area("Response", value=EXAMPLE_RESPONSE, height=150, key="rep_response")
if up is not None:
    try:
        rr = up.getvalue().decode("utf-8")
    except UnicodeDecodeError:
        st.error("The uploaded file is not UTF-8 text")
steer_on = st.toggle("Apply the distractor steering during the replay", value=False, key="rep_steer",
                     help="The paper's single example was replayed with steering on; its statistics with it off.")
how = st.radio("Circuit activity", ["sum", "mean"], horizontal=True, key="rep_how")
if st.button("Replay", key="rep_go", type="primary"):
    if circuit is None:
        st.error("No resistance circuit for this model and SAE.")
    else:
        try:
            with st.spinner("Reading the transcript…"):
                ss.res_replay = rv.replay_episode(eng, rp, rr, circuit, backtrack,
                                                  steering=[distractor] if steer_on else [], how=how)
        except EsrError as exc:
            st.error(str(exc))
rep = ss.get("res_replay")
if rep is not None:
    st.markdown(f"**Replay with steering {'ON (latent #%d)' % rep['steering'][0]['latent'] if rep['steering_on'] else 'off'}**")
    series = []
    toks = rep["tokens"]
    run = "steered" if rep["steering_on"] else "unsteered"
    if "circuit" in rep["series"]:
        series.append(Series("resistance circuit", rep["series"]["circuit"], colour=circuit.colour, lane="circuit",
                             tokens=toks, run=run, threshold=rep.get("threshold")))
    if "backtracking" in rep["series"]:
        series.append(Series("backtracking", rep["series"]["backtracking"], colour=backtrack.colour,
                             lane="backtracking", tokens=toks, run=run))
    for lat, vals in rep["distractor_series"].items():
        series.append(Series(f"distractor #{lat}", vals, colour=palette.DISTRACTOR, lane="distractor", tokens=toks,
                             run=run))
    regions = [Region(r["start"], r["end"], r["label"], rv.region_rgba(r["label"])) for r in rep["regions"]]
    markers = [Marker(m["token"], "restart") for m in rep["markers"]]
    markers += [Marker(t, "crossing", palette.CIRCUIT) for t in rep.get("crossings", [])[:10]]
    st.plotly_chart(timeline_figure(series, regions=regions, markers=markers), key="rep_chart")
    st.html(rv.replay_hooks_html(rep))
    if "circuit" in rep["series"]:
        hm_vals, hm_label = list(rep["series"]["circuit"]), "resistance circuit"
        mem = (rep.get("members") or {}).get("circuit")
        if mem is not None and len(circuit.members) > 1:
            # several latents on one colour: each ÷ its own scale, never one shared raw scale
            v, note = normalised_member_series(mem, circuit, _ui.read_catalog(), how=rep.get("how", "sum"))
            hm_vals = list(ema(v, rep.get("ema_alpha")) if rep.get("ema_alpha") else v)
            hm_label = f"resistance circuit · {note}"
        st.html(render_heatmap(toks, hm_vals, label=hm_label, colour=circuit.colour))
    st.dataframe(pd.DataFrame(rv.region_rows(rep["summary"])), hide_index=True, key="rep_table")
    st.caption("Ratios are each region's mean over the group's mean on unsteered on-topic answers (the paper's "
               "baseline: 4.4x off-topic, 2.1x after the correction), never over the prompt.")
    st.markdown(html.escape(rep.get("verdict", "")))
