"""The resistance circuits (#13), on the real model: what they detect, against controls.

Two groups ship for the default SAE: the live circuit (#1229, found by max-pooling) and the
token-level search's controlled group (``esr-lab detectors token-search``). The controlled group
is quiet on the Home examples' unsteered answers and no more active on garbled on-topic text
than on clean text, where #1229 fails both (it is the control that shows the tests can fail);
#1229 is the one that separates a run's steered answers from its unsteered ones live, and says
in its evidence what else it fires on. The per-layer numbers are reproduced by the command that
made them, on a small sample.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from esr_core.latents.groups import LatentGroup, load_group
from esr_core.paths import ASSETS_DIR, REPO_ROOT
from esr_core.resistance.signals import ema
from esr_core.resistance.token_inputs import garble
from esr_core.steering.spec import GenerationSpec

pytestmark = pytest.mark.slow

CIRCUIT = ASSETS_DIR / "groups" / "resistance_circuit.json"
CONTROLLED = ASSETS_DIR / "groups" / "offtopic_controlled.json"
SAMPLE = ASSETS_DIR / "resistance" / "token_search_sample.json"
OLD = LatentGroup(name="#1229", members=[1229], extra={"threshold": {"value": 3.23432, "how": "sum"}})
DEFAULT_SAE = "assets/sae/smollm2-135m-instruct"


LIVE_L20 = ASSETS_DIR / "groups" / "resistance_circuit.smollm2-135m-instruct-L20.json"


def _circuit() -> LatentGroup:
    return load_group(CONTROLLED)


def _engine_for(group: LatentGroup):
    """An engine that reads the group's SAE (a readout SAE when the group lives on another layer)."""
    from esr_core.steering.engines import get_engine

    src = (group.extra.get("sae") or {}).get("source", DEFAULT_SAE)
    return get_engine("smollm2-135m-instruct", None, read_sae=None if src == DEFAULT_SAE else str(REPO_ROOT / src))


@pytest.fixture(scope="module", params=[CONTROLLED, LIVE_L20], ids=["controlled-L15", "live-L20"])
def controlled(request):
    """(group, engine) for each controlled group: the block-15 one and the block-20 one searched live."""
    g = load_group(request.param)
    return g, _engine_for(g)


@pytest.fixture(scope="module")
def circuit_engine():
    return _engine_for(_circuit())


@pytest.fixture(scope="module")
def steer_engine():
    from esr_core.steering.engines import get_engine

    return get_engine("smollm2-135m-instruct", None)


def _lane(engine, prompt: str, response: str, group: LatentGroup) -> np.ndarray:
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    acts = engine.activations(messages=msgs)
    start = acts.text.find(response)
    first = next(t for t, (s, e) in enumerate(acts.offsets) if s >= start and e > s)
    z = acts.z[first:, group.members].float().numpy()
    return ema(z.sum(axis=1), 0.5)


def test_both_circuits_record_their_token_level_evidence_and_controls():
    live, controlled = load_group(CIRCUIT), _circuit()
    ev = live.extra["evidence"]
    assert "fires on garbled text" in live.stats["1229"]["controls_failed"]
    assert ev["heldout"]["crossing_rate_shuffled"] > 0.5  # said plainly, next to the group
    assert ev["baseline"]["members"] == controlled.members
    cev = controlled.extra["evidence"]
    assert cev["heldout"]["crossing_rate_unsteered"] <= 0.05 + 1e-9
    assert cev["n_passing"] >= len(controlled.members) >= 1
    for j in controlled.members:
        st = controlled.stats[str(j)]
        assert {"token_matched_auc", "position_matched_auc", "garbled_auc", "system_ratio"} <= set(st)
    assert {row["hook"] for row in controlled.extra["layers"]} == {"blocks.15.hook_resid_post",
                                                                   "blocks.20.hook_resid_post"}


def test_the_circuit_stays_quiet_on_the_home_examples_unsteered_answers(controlled):
    g, circuit_engine = controlled
    thr = g.threshold_value("sum")
    exs = [e for e in json.loads((ASSETS_DIR / "examples.json").read_text())["examples"]
           if e.get("model", "smollm2-135m-instruct") == "smollm2-135m-instruct"]
    assert exs
    for e in exs:
        spec = GenerationSpec(prompt=e["prompt"], max_new_tokens=int(e.get("max_new_tokens", 32)), seed=0,
                              temperature=0.0, runs=("default",), watch=list(g.members))
        res = circuit_engine.generate(spec)["default"]
        lane = ema(np.asarray(res.acts)[:, : len(g.members)].sum(axis=1), 0.5)
        assert lane.max() <= thr, f"crosses at token {int(np.argmax(lane > thr))} of the unsteered {e['prompt']!r}"


def test_garbled_on_topic_text_is_not_more_active_than_clean(controlled, steer_engine):
    answers = [json.loads(line) for line in (ASSETS_DIR / "prompts" / "default_answers.jsonl").read_text().splitlines()
               if line.strip()][:8]
    prompts = {p["id"]: p["prompt"] for p in json.loads((ASSETS_DIR / "prompts" / "howto_prompts.json").read_text())}

    def ratio(engine, group):
        clean, garbled = [], []
        for k, a in enumerate(answers):
            text = a["answer"][:500]
            clean.append(_lane(engine, prompts[a["id"]], text, group).mean())
            for how in ("shuffle", "repeat"):
                garbled.append(_lane(engine, prompts[a["id"]], garble(text, how, k), group).mean())
        return float(np.mean(garbled)) / max(float(np.mean(clean)), 1e-6)

    new = ratio(controlled[1], controlled[0])
    old = ratio(steer_engine, OLD)
    assert old > 2.0  # the control: the first circuit fires on garbling
    assert new <= 1.5, f"garbled / clean activity {new:.2f}"


def test_the_block20_group_searched_live_passes_every_control_and_separates_part_of_the_steered_answers():
    """The live search (drifts read with their steering on, distractors held out) at block 20:
    quiet when unsteered and under the steering alone, and 3 of 12 vs 0 of 12 on the reference
    run (measured; the issue's goal, 10 of 12 vs 0 of 12, is not met by any controlled group)."""
    from esr_core.experiments.mechanism import circuit_separation

    g = load_group(LIVE_L20)
    assert g.extra["summary"]["drifts_read"] == "with their steering on"
    h = g.extra["evidence"]["heldout"]
    assert h["crossing_rate_unsteered"] <= 0.05 and h["crossing_rate_steering_only"] <= 0.1
    assert all(g.stats[str(j)]["steering_auc"] is not None for j in g.members)
    res = circuit_separation(ASSETS_DIR / "experiments" / "reference", _engine_for(g), g, n=12)
    assert res["steered_off_topic"]["crossed"] >= 2 and res["unsteered"]["crossed"] <= 1, res
    rec = g.extra["evidence"]["separation"]  # what the Resistance page shows is what the command measures
    assert (rec["steered_off_topic"], rec["unsteered"]) == (res["steered_off_topic"], res["unsteered"])


def test_the_live_circuit_is_read_live_too_and_does_not_answer_to_the_steering_alone():
    """#1229's live-condition evidence: it crosses on most held-out drifts read with their steering
    on, and on on-topic answers read with the same steering about as often as unsteered ones."""
    live = load_group(CIRCUIT).extra["evidence"]["live"]
    h = live["heldout"]
    assert live["drifts_read"] == "with their steering on" and live["distractors_held_out"] is True
    assert h["crossing_rate_steered_drift"] > 0.7
    assert abs(h["crossing_rate_steering_only"] - h["crossing_rate_unsteered"]) < 0.05


def test_the_live_circuit_separates_steered_off_topic_from_unsteered_answers(steer_engine):
    """#1229 on the reference run's own answers, replayed with their steering (evaluation prompts)."""
    from esr_core.experiments.mechanism import circuit_separation

    g = load_group(CIRCUIT)
    res = circuit_separation(ASSETS_DIR / "experiments" / "reference", steer_engine, g, n=12)
    assert res["steered_off_topic"]["crossed"] >= 8 and res["unsteered"]["crossed"] <= 3, res
    rec = g.extra["evidence"]["separation"]
    assert (rec["steered_off_topic"], rec["unsteered"]) == (res["steered_off_topic"], res["unsteered"])


@pytest.mark.parametrize("sample", ["token_search_sample.json", "token_search_live_sample.json"])
def test_the_layer_comparison_reproduces_on_a_small_sample(steer_engine, sample):
    """Both searches (drifts read unsteered; drifts read live, with their steering on) reproduce."""
    from esr_core.models.sae import load_sae
    from esr_core.resistance.token_detectors import TokenSearchParams, run_search
    from esr_core.resistance.token_report import layer_table

    rep = json.loads((ASSETS_DIR / "resistance" / sample).read_text())
    saes = [load_sae(str(REPO_ROOT / la["sae"]["source"])) if not la["sae"]["source"].startswith("/")
            else load_sae(la["sae"]["source"]) for la in rep["layers"]]
    params = TokenSearchParams(**{k: v for k, v in rep["params"].items()})
    inputs = REPO_ROOT / rep.get("inputs", "assets/prompts/detector_inputs.jsonl")
    got = run_search(steer_engine.model, saes, params, inputs_path=inputs, steer_sae=steer_engine.sae)
    assert got["drifts_read"] == rep.get("drifts_read", "unsteered") and got["inputs_sha1"] == rep["inputs_sha1"]
    searched = [r for r in rep["layer_table"] if r["group"] == "searched"]
    assert len(searched) == 2  # the steering layer (15) and the readout layer (20)
    for want, have in zip(searched, layer_table(got)):
        assert have["hook"] == want["hook"] and have["members"] == want["members"]
        for k in ("token_auc", "unsteered_crossing", "ratio_off_topic", "steering_only_crossing"):
            if k in want:
                assert have[k] == pytest.approx(want[k], abs=1e-3), k
