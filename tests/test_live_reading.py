"""The live condition read back in a batch (#13): a drift read with its steering on gives exactly
the codes the engine's own steered forward gives, and the steering reaches the readout layer."""

from __future__ import annotations

import numpy as np
import pytest

from esr_core.paths import ASSETS_DIR
from esr_core.resistance import token_detectors as td
from esr_core.resistance import token_inputs as ti
from esr_core.steering.interventions import Intervention

pytestmark = pytest.mark.slow
L20 = str(ASSETS_DIR / "sae" / "smollm2-135m-instruct-L20")


@pytest.fixture(scope="module")
def engine():
    from esr_core.steering.engines import get_engine

    return get_engine("smollm2-135m-instruct", None, read_sae=L20)


def test_batched_steered_read_equals_the_engines_steered_forward(engine):
    prompt, resp = "How do I boil an egg?", "Put the egg in boiling water for nine minutes, then cool it."
    other = ("How do I tie a tie?", "Cross the wide end over the narrow end and pull it through the loop.")
    steer = (4472, 60.0)
    chats = [ti.Chat(0, "drift", prompt, resp, [(0, len(resp), "drift")], steer),
             ti.Chat(1, "on", other[0], other[1], [(0, len(other[1]), "on")])]
    codes = td.read_codes(engine.model, [engine.sae, engine.read_sae], chats, batch_size=2, steer_sae=engine.sae)
    for c, ivs in ((0, [Intervention(latent=steer[0], mode="add", strength=steer[1], units="raw")]), (1, [])):
        ch = chats[c]
        acts = engine.activations(messages=[{"role": "user", "content": ch.prompt},
                                            {"role": "assistant", "content": ch.response}], interventions=ivs)
        start = acts.text.find(ch.response)
        first = next(t for t, (s, e) in enumerate(acts.offsets) if s >= start and e > s)
        want = acts.z[first:].float().numpy()  # the engine reads the block-20 SAE
        got = codes.codes[engine.read_hook_name][np.where(codes.chat == c)[0]].toarray()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
    # the steering acted: the steered chat's block-15 code carries the distractor, the unsteered one does not
    z15 = codes.codes[engine.sae.hook_name]
    assert z15[np.where(codes.chat == 0)[0]][:, steer[0]].toarray().mean() > 1.0
    assert z15[np.where(codes.chat == 1)[0]][:, steer[0]].toarray().max() == 0.0


def test_live_drifts_hold_out_their_distractors_with_their_prompts(engine):
    rows = [{"id": f"t{i}", "prompt": p, "answer": "An answer."} for i, p in enumerate(
        ["How do I boil an egg?", "How do I tie a tie?", "Explain how to plant a tree.", "How do you wash a car?",
         "Explain how to make tea.", "How do I sharpen a pencil?", "How do I fold a shirt?", "How do I fix a chair?",
         "How do I clean a window?", "Explain how to bake bread.", "How do I change a tyre?", "How do I paint a wall?",
         "How do I make rice?", "How do I water a cactus?"])]
    latents = [4472, 5816, 7300, 1912, 4707, 7261, 3437, 7961]
    search_lat, held_lat = ti.split_latents(latents, 0.3, 0)
    _, held_rows = ti.split_prompts(rows, 0.3, 0)
    out = ti.generate_live_drifts(engine, rows, latents, (2.0, 2.0), max_new_tokens=12, off_topic_below=101.0)
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    for k, r in enumerate(out):  # every drift kept (threshold 101): each one's latent is on its prompt's side
        assert r["drift"] and r["drift_boost_norm"] == 2.0
        assert r["drift_boost"] == pytest.approx(2.0 * engine.median_norm, rel=1e-4)
        side = "heldout" if k in held_rows else "search"
        assert r["drift_split"] == side
        assert r["drift_latent"] in (held_lat if side == "heldout" else search_lat)
    again = ti.generate_live_drifts(engine, rows, latents, (2.0, 2.0), max_new_tokens=12, off_topic_below=101.0)
    assert [r["drift"] for r in again] == [r["drift"] for r in out]  # recorded seeds: the same drifts again
