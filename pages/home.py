"""Home: what ESR is, the paper's key numbers, and one-click examples for the loaded model."""

import streamlit as st

from esr_core.app.session import example_steering, load_examples
from esr_core.models.registry import DEFAULT_MODEL, get_entry
from pages import _ui
from pages._sidebar import request_model

_ui.require_frame()
ss = st.session_state

st.title("ESR Lab")
st.markdown(
    "**Endogenous Steering Resistance (ESR)**: we push a language model off-task by adding a sparse-autoencoder "
    "latent's direction to its residual stream, and watch whether it notices mid-answer (\"wait, that's not "
    "right\") and gets back on track while the steering stays on.  \n"
    "In the paper, Llama-3.3-70B recovers in **3.8 %** of steered answers (multi-attempt **7.4 %**), smaller "
    "models in **< 1 %**, and no model ever restarts **without steering (0 %)**.  \n"
    "Telling the model to stay on track raises its multi-attempt rate **4.3x**, and **26 detector latents** that "
    "fire on off-topic text form a circuit whose ablation reduces recovery.")

for col, (label, value, note) in zip(st.columns(4), (
        ("ESR, Llama-3.3-70B", "3.8 %", "multi-attempt 7.4 %, n = 4,877"),
        ("ESR, 8B and smaller", "< 1 %", "scale-dependent"),
        ("No steering", "0 %", "multi-attempt, 13,118 trials"),
        ("Meta-prompt", "4.3x", "multi-attempt, 70B"))):
    col.metric(label, value)
    col.caption(note)


def open_example(ex: dict) -> None:
    """A button callback (it runs before the next script run): a model switch set here reaches the
    sidebar's picker before it is drawn, even when the browser resends the picker's old value."""
    ss.pending_example = dict(ex)
    if ex.get("model", DEFAULT_MODEL) != ss.get("model_choice", DEFAULT_MODEL):
        request_model(ex.get("model", DEFAULT_MODEL))  # the sidebar follows: the model loads, then it runs
    ss["_home_go_lab"] = True


if ss.pop("_home_go_lab", False):
    st.switch_page("pages/steering.py")


loaded = (ss.get("engine").model.name if ss.get("engine") is not None
          else (ss.get("engine_loading") or (ss.get("model_choice", DEFAULT_MODEL),))[0])
mine, others = load_examples(model=loaded), [e for e in load_examples() if e.get("model", DEFAULT_MODEL) != loaded]
recoveries = [e for e in mine + others if e.get("kind") == "recovery"]
rest = [e for e in mine + others if e.get("kind") != "recovery"]


def example_card(key: str, ex: dict, primary: bool) -> None:
    model = ex.get("model", DEFAULT_MODEL)
    with st.container(border=True):
        st.markdown(f"**{ex.get('title', 'Example')}**  \n{ex.get('blurb', '')}")
        st.caption(f"Prompt: {ex.get('prompt', '')} · steering: {example_steering(ex)} · model {model}"
                   + (f" · seed {ex['seed']}, temperature {ex['temperature']}" if ex.get("temperature") else ""))
        if model == loaded:
            st.button("Open in the steering lab", key=key, type="primary" if primary else "secondary",
                      on_click=open_example, args=(ex,))
        else:
            entry = get_entry(model)
            st.button(f"Switch to {entry.label if entry else model} and open", key=key,
                      type="primary" if primary else "secondary", on_click=open_example, args=(ex,))


if recoveries:
    st.subheader("Watch a recovery")
    st.caption("On the resistance-tuned SmolLM2 (a LoRA trained on synthetic self-corrections, see the Experiments "
               "page for its measured rates): the steered answer drifts, the resistance circuit crosses its "
               "threshold, the model says a restart phrase and answers the task with the steering still on.")
    for i, ex in enumerate(recoveries):
        example_card(f"recovery_{i}", ex, primary=i == 0)
st.subheader("Try it")
if not mine:
    st.info(f"No example is shipped for {loaded}." + (" The examples below were found on another model: opening "
                                                      "one switches the sidebar to it." if others else ""))
elif not [e for e in rest if e.get("model", DEFAULT_MODEL) == loaded]:
    st.caption("The examples below were found on another model: opening one switches the sidebar to it.")
for i, ex in enumerate(rest):
    example_card(f"example_{i}", ex, primary=i == 0 and not recoveries)
if [e for e in rest if e.get("model", DEFAULT_MODEL) == DEFAULT_MODEL]:
    st.caption("The base SmolLM2 examples drift and stay drifted: a 135M model does not recover on its own "
               "(0 of 100 steered trials in the shipped reference run).")

st.subheader("Where to go")
for page, label, icon in (
        ("pages/latents.py", "Latents: search descriptions, see which latents fire on your text", ":material/search:"),
        ("pages/steering.py", "Steering lab: steer, stream both answers, heatmaps and timelines", ":material/science:"),
        ("pages/resistance.py", "Resistance: the off-topic detectors, one click per condition, replay a transcript",
         ":material/shield:"),
        ("pages/experiments.py", "Experiments: ESR rates with intervals, boost sweeps, detector ablation, plots",
         ":material/monitoring:")):
    st.page_link(page, label=label, icon=icon)
st.caption("Numbers: McKenzie et al. 2026, arXiv 2602.06941. A 135M model is expected to show ESR near 0 %: "
           "that is the scale-dependent result, not a bug.")
