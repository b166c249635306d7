"""Home: what ESR is, the paper's key numbers, and a one-click example."""

import streamlit as st

from esr_core.app.session import load_examples
from pages import _ui

_ui.require_frame()

st.title("ESR Lab")
st.markdown(
    "**Endogenous Steering Resistance (ESR)**: we push a language model off-task by adding a sparse-autoencoder "
    "latent's direction to its residual stream, and watch whether it notices mid-answer (\"wait, that's not "
    "right\") and gets back on track while the steering stays on.  \n"
    "In the paper, Llama-3.3-70B recovers in **3.8 %** of steered answers (multi-attempt **7.4 %**), smaller "
    "models in **< 1 %**, and no model ever restarts **without steering (0 %)**.  \n"
    "Telling the model to stay on track raises its multi-attempt rate **4.3x**, and **26 detector latents** that "
    "fire on off-topic text form a circuit whose ablation reduces recovery.")

c1, c2, c3, c4 = st.columns(4)
c1.metric("ESR, Llama-3.3-70B", "3.8 %", "multi-attempt 7.4 %", delta_color="off")
c2.metric("ESR, 8B and smaller", "< 1 %", "scale-dependent", delta_color="off")
c3.metric("No steering", "0 %", "13,118 trials", delta_color="off")
c4.metric("Meta-prompt", "4.3x", "multi-attempt, 70B", delta_color="off")

st.subheader("Try it")
examples = load_examples()
if not examples:
    st.info("No examples are shipped (assets/examples.json is missing).")
for i, ex in enumerate(examples):
    with st.container(border=True):
        st.markdown(f"**{ex.get('title', 'Example')}**  \n{ex.get('blurb', '')}")
        st.caption(f"Prompt: {ex.get('prompt', '')} · steering: add latent #{ex.get('latent')} at "
                   f"{ex.get('strength')} x median residual norm ({ex.get('positions', 'all')} positions)")
        if st.button("Open in the steering lab", key=f"example_{i}", type="primary" if i == 0 else "secondary"):
            ss = st.session_state
            _ui.set_persisted("prompt", ex["prompt"])
            ss.ivs = [{"latent": int(ex["latent"]), "mode": ex.get("mode", "add"),
                       "strength": float(ex["strength"]), "units": ex.get("units", "norm"),
                       "positions": ex.get("positions", "all")}]
            _ui.set_persisted("watch_text", ",".join(str(x) for x in ex.get("watch", [ex["latent"]])))
            ss.watch = [int(x) for x in ex.get("watch", [ex["latent"]])]
            _ui.set_persisted("max_new_tokens", int(ex.get("max_new_tokens", 48)))
            _ui.set_persisted("seed", int(ex.get("seed", 0)))
            ss.autostart = True
            st.switch_page("pages/steering.py")

st.subheader("Where to go")
st.page_link("pages/latents.py", label="Latents: search descriptions, see which latents fire on your text", icon=":material/search:")
st.page_link("pages/steering.py", label="Steering lab: steer, stream both answers, heatmaps and timelines", icon=":material/science:")
st.caption("Numbers: McKenzie et al. 2026, arXiv 2602.06941. A 135M model is expected to show ESR near 0 %: "
           "that is the scale-dependent result, not a bug.")
