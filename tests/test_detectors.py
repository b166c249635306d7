"""Detector search, ablation of the circuit, CLI and the Resistance page on the real default model + SAE."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from esr_core.errors import BadInput
from esr_core.latents.groups import GroupUnavailable, LatentGroup, load_group, save_group, shipped_group
from esr_core.models.hooks import hook_module
from esr_core.models.registry import DEFAULT_MODEL, get_entry
from esr_core.resistance import detectors as det
from esr_core.resistance.episodes import derangement
from esr_core.resistance.signals import rank_auc, youden_threshold

SAE_DIR = get_entry(DEFAULT_MODEL).default_sae_path
pytestmark = pytest.mark.skipif(not (SAE_DIR / "sae_weights.safetensors").exists(),
                                reason=f"the default SAE ({SAE_DIR}) is not in this checkout")

# our own short answers (distinct topics), so the test does not depend on generated files
FIXTURE = [
    ("Explain how to clean a cast iron pan after cooking.", "chores",
     "Let the pan cool a little, then rinse it under hot water and scrub off stuck food with a stiff brush and "
     "coarse salt. Avoid soaking it. Dry it completely on the stove and rub a thin layer of cooking oil over the "
     "surface so it does not rust."),
    ("Explain how to calculate the area of a circle.", "maths",
     "Measure the radius, the distance from the centre to the edge. Square the radius and multiply by pi, about "
     "3.14. For a radius of 3 cm the area is 3.14 times 9, roughly 28.3 square centimetres."),
    ("How do you make pancakes from scratch?", "cooking",
     "Whisk flour, sugar, baking powder and a pinch of salt in a bowl. Beat in milk, an egg and melted butter "
     "until the batter is smooth. Pour small ladles onto a hot greased pan and flip each pancake when bubbles "
     "appear on top."),
    ("How do you prepare for a job interview?", "work",
     "Research the company and the role, then match your experience to the job description. Practise answers to "
     "common questions out loud, prepare a few questions of your own, and plan your outfit and route the day "
     "before."),
    ("Explain how to fix a flat bicycle tyre.", "repairs",
     "Remove the wheel and lever the tyre off the rim. Pull out the inner tube, find the puncture by pumping it "
     "up and listening for air, then patch it or fit a new tube. Refit the tyre, inflate it to the pressure on "
     "the sidewall and put the wheel back."),
    ("How do you grow basil on a windowsill?", "gardening",
     "Plant basil seeds in a small pot of moist potting mix and place it on a sunny windowsill. Water when the "
     "top of the soil feels dry and pinch off the top leaves regularly so the plant grows bushy instead of tall."),
    ("Explain how to pack a suitcase for a one-week trip.", "travel",
     "Lay out outfits for each day and remove anything you will not wear. Roll soft clothes to save space, put "
     "shoes at the bottom near the wheels, and keep toiletries in a sealed bag. Leave a little room for things "
     "you buy on the way."),
    ("How do you start saving for an emergency fund?", "money",
     "Work out your essential monthly costs and set a target of three to six months of them. Open a separate "
     "savings account and set up an automatic transfer on payday, even a small one, and add any bonuses or "
     "refunds to it."),
    ("How do you memorise vocabulary in a foreign language?", "study",
     "Learn a few new words every day with flashcards and review them at growing intervals. Say each word aloud, "
     "use it in a sentence of your own, and group words by theme so they are easier to recall."),
    ("Explain how to build a campfire safely.", "everyday",
     "Choose a cleared spot or an existing fire ring away from trees and tents. Build a small tepee of dry "
     "kindling over tinder, light it from the windward side, and add larger logs slowly. Keep water nearby and "
     "drown the fire completely before you leave."),
]


@pytest.fixture(scope="module")
def engine():
    from esr_core.steering.engines import get_engine

    return get_engine(DEFAULT_MODEL, None)


@pytest.fixture(scope="module")
def small_group(engine):
    prompts = [{"id": f"t{i}", "prompt": p, "topic": t} for i, (p, t, _) in enumerate(FIXTURE)]
    answers = [a for _, _, a in FIXTURE]
    params = det.DetectorParams(threshold=1.0, relax_to=0.7, min_size=2, max_size=8, derangements=2,
                                heldout_seeds=(1001,))
    return det.find_detectors(engine, params, prompts, answers), prompts, answers


def test_search_group_separates_held_out_derangement(small_group, engine):
    g, prompts, answers = small_group
    thr = g.extra["params"]["threshold_used"]
    assert g.members, "no latent separates off-topic from on-topic pairs"
    assert 0.7 <= thr <= 1.0
    for i in g.members:
        s = g.stats[str(i)]
        assert s["auc"] >= thr - 1e-9
        assert s["off_mean"] > s["on_mean"]
    held = [g.stats[str(i)]["auc_heldout"] for i in g.members]
    assert np.mean(held) >= thr - 0.05, held  # the group generalises to a pairing it never saw
    assert g.threshold["value"] >= 0
    assert g.extra["sae"]["weights_hash"] and g.extra["model"] == DEFAULT_MODEL
    # recompute one member's held-out AUC independently from fresh forward passes
    i = g.members[0]
    d = derangement(len(prompts), 1001, [p["topic"] for p in prompts])
    on = det.pooled_pairs(engine, [(p["prompt"], a) for p, a in zip(prompts, answers)]).pooled[:, i]
    off = det.pooled_pairs(engine, [(prompts[k]["prompt"], answers[int(d[k])]) for k in range(len(prompts))]).pooled[:, i]
    assert rank_auc(off, on)[0] == pytest.approx(g.stats[str(i)]["auc_heldout"], abs=1e-3)


def test_group_round_trip(tmp_path, small_group, engine):
    g = small_group[0]
    p = save_group(g, tmp_path / "g.json")
    back = load_group(p)
    assert back.members == g.members and back.matches(engine)
    assert back.stats == g.stats and back.threshold == g.threshold
    back.extra["sae"]["weights_hash"] = "0" * 16
    assert not back.matches(engine)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GroupUnavailable):
        load_group(tmp_path / "bad.json")


def test_ablating_the_group_zeroes_members_in_a_steered_run(small_group, engine):
    from esr_core.experiments.conditions import build_conditions
    from esr_core.steering.interventions import Intervention
    from esr_core.steering.spec import GenerationSpec

    members = small_group[0].members
    off_text = " ".join(a for _, _, a in FIXTURE[1:5])  # other prompts' answers: off-topic for prompt 0
    dis = Intervention(latent=int(members[-1]) + 1 if members[-1] + 1 < engine.sae.d_sae else 0, mode="add",
                       strength=0.5)
    base = GenerationSpec(prompt=FIXTURE[0][0], watch=list(members), max_new_tokens=5, seed=3, temperature=0.6, top_k=0)
    cond = {c.key: c for c in build_conditions(base, dis, LatentGroup(name="c", members=members), engine.sae.d_sae,
                                               keys=["steering", "detector_ablation"])}
    res = engine.generate(cond["detector_ablation"].spec)["steered"]
    assert np.all(res.acts == 0) and np.all(res.prompt.acts == 0)  # engine readout after ablation

    # re-encode check: the residual that leaves the hook no longer carries the members
    msgs = [{"role": "user", "content": FIXTURE[0][0]}, {"role": "assistant", "content": off_text}]
    grabbed = {}

    def grab(_m, _i, out):
        grabbed["h"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    hp = hook_module(engine.model, engine.hook_name)
    h = hp.register_forward_hook(grab)  # registered after the engine's hook: sees the edited residual
    try:
        engine.activations(messages=msgs, interventions=cond["steering"].spec.interventions)
        before = det.encode(engine, grabbed["h"][0])[1:, members].sum().item()
        engine.activations(messages=msgs, interventions=cond["detector_ablation"].spec.interventions)
        after = det.encode(engine, grabbed["h"][0])[1:, members].sum().item()
    finally:
        h.remove()
    assert before > 0
    assert after <= 0.25 * before, (before, after)


def test_condition_specs_replay_identical_seed(engine):
    from esr_core.experiments.conditions import build_conditions
    from esr_core.steering.interventions import Intervention
    from esr_core.steering.spec import GenerationSpec

    base = GenerationSpec(prompt=FIXTURE[1][0], max_new_tokens=4, seed=11, temperature=0.6, watch=[1], top_k=0)
    c = build_conditions(base, Intervention(latent=7, strength=2.0), None, engine.sae.d_sae,
                         keys=["no_steering"])[0]
    a, b = engine.generate_batch([c.spec, c.spec])
    assert a["steered"].token_ids == b["steered"].token_ids


def test_cli_bad_input_and_show(capsys):
    from esr_core.cli import main

    assert main(["detectors", "find", "--threshold", "2"]) == 2
    assert "AUC threshold" in capsys.readouterr().err
    rc = main(["detectors", "show", "--json"])
    if shipped_group("circuit") is None:
        assert rc == 2
    else:
        import json

        assert rc == 0
        g = json.loads(capsys.readouterr().out)
        assert g["members"] and set(g["stats"]) == {str(i) for i in g["members"]}


def test_resistance_page_renders_circuit_table(engine):
    from conftest import open_app_page

    if shipped_group("circuit") is None:
        pytest.skip("no shipped resistance circuit yet")
    at = open_app_page("pages/resistance.py")
    assert not at.exception, [e.value for e in at.exception]
    assert any(t.value == "Resistance" for t in at.title)
    frames = at.dataframe
    assert frames, "the circuit table is missing"
    members = shipped_group("circuit").members
    assert list(frames[0].value["latent"]) == members


def test_youden_threshold_separates_peaks_and_respects_floor():
    on = [0.0, 0.0, 1.0, 2.0]
    off = [3.0, 4.0, 5.0, 1.5]
    t = youden_threshold(on, off)
    # best split is between 2.0 and 3.0: all on-topic below, 3 of 4 off-topic above
    assert t["value"] == pytest.approx(2.5)
    assert (t["tpr"], t["fpr"]) == (0.75, 0.0)
    assert t["j"] == pytest.approx(0.75)
    # a floor above the best split wins: the threshold is never below it
    t2 = youden_threshold(on, off, floor=3.5)
    assert t2["value"] >= 3.5 and t2["fpr"] == 0.0 and t2["tpr"] == 0.5
    # identical classes: no split beats J = 0, and the highest threshold is kept (no false alarms)
    t3 = youden_threshold([1.0, 2.0], [1.0, 2.0])
    assert t3["j"] == pytest.approx(0.0) and t3["fpr"] == 0.0
    with pytest.raises(BadInput):
        youden_threshold([], [1.0])
