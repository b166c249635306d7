"""Pure resistance-view functions on hand-made arrays, and condition specs (no model needed)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from esr_core.errors import BadInput
from esr_core.experiments.conditions import DEFAULT_META_VARIANT, META_PROMPTS, build_conditions, random_latents
from esr_core.latents.groups import LatentGroup
from esr_core.resistance import view as rv
from esr_core.resistance.detectors import DetectorParams, select_latents
from esr_core.resistance.episodes import derangement
from esr_core.resistance.signals import class_stats, ema, rank_auc
from esr_core.steering.interventions import Intervention
from esr_core.steering.spec import GenerationSpec

GROUP = LatentGroup.from_dict({"name": "g", "members": [2, 5], "weights": [1.0, 2.0],
                               "threshold": {"value": 3.0, "how": "sum"}})
META_PROMPT = META_PROMPTS[DEFAULT_META_VARIANT]


def test_ema_matches_recurrence():
    x = [0.0, 4.0, 0.0, 2.0]
    # s0 = 0, s1 = 2, s2 = 1, s3 = 1.5
    assert np.allclose(ema(x, 0.5), [0.0, 2.0, 1.0, 1.5])
    assert np.allclose(ema(x, None), x)
    with pytest.raises(BadInput):
        ema(x, -0.1)


def test_circuit_activity_full_code_and_watched_columns():
    z = np.zeros((4, 8))
    z[1, 2] = 1.0
    z[2, 5] = 3.0
    raw = rv.circuit_activity(z, GROUP, ema_alpha=None)
    assert np.allclose(raw, [0, 1, 6, 0])  # weights 1 and 2
    assert np.allclose(rv.circuit_activity(z, GROUP, how="mean", ema_alpha=None), [0, 1 / 3, 2, 0])
    assert np.allclose(rv.circuit_activity(z, GROUP, ema_alpha=0.5), [0, 0.5, 3.25, 1.625])
    # the same from a watched readout with columns [5, 9, 2]
    acts = z[:, [5, 0, 2]]
    assert np.allclose(rv.circuit_activity(acts, GROUP, ema_alpha=None, columns=[5, 9, 2]), raw)
    assert rv.missing_members(GROUP, [5, 9]) == [2]
    with pytest.raises(BadInput):
        rv.circuit_activity(np.zeros((3, 4)), GROUP)  # latent 5 outside a width-4 code


def test_threshold_crossings_rising_edges_only():
    s = [0, 1, 3, 4, 2, 3, 0, 5]
    assert rv.threshold_crossings(s, 3) == [3, 7]
    assert rv.threshold_crossings(s, 2.5) == [2, 5, 7]
    assert rv.threshold_crossings([5, 5, 1], 3) == [0]
    assert rv.threshold_crossings([0, 0, 0.2, 0], 0.0) == [2]  # a zero threshold: any activity
    assert rv.threshold_crossings([], 1) == []
    assert GROUP.threshold_value() == 3.0
    assert GROUP.threshold_value(how="mean") == 1.5
    assert LatentGroup(name="h", members=[1]).threshold_value() is None


def _fake_episode():
    # prompt tokens 0..2 (offsets in the full text), response starts at char 100
    resp = "Rinse it. Dogs bark loudly. Wait, that's not right. Scrub with salt."
    base = 100
    words = []
    pos = 0
    for w in resp.split(" "):
        words.append((base + pos, base + pos + len(w)))
        pos += len(w) + 1
    offsets = [(0, 0), (0, 50), (50, 100)] + words + [(base + len(resp), base + len(resp) + 10)]
    assert resp.index("Dogs") > 0
    k2 = resp.index("Wait")
    k3 = resp.index("Scrub")
    j = {"attempts": [{"attempt_text": resp[:k2], "score": 20, "start_char": 0, "end_char": k2},
                      {"attempt_text": resp[k2:], "score": 80, "start_char": k2, "end_char": len(resp)}],
         "restart_phrases": [{"text": "Wait, that's not right", "start_char": k2, "end_char": k3 - 2}]}
    return resp, offsets, j


def test_regions_from_judgement_known_offsets():
    resp, offs, j = _fake_episode()
    regions = rv.regions_from_judgement(j, offs, prompt_len=3, response_start_char=100)
    labels = rv.region_labels(regions, len(offs))
    toks = ["<s>", "p1", "p2"] + resp.split(" ") + ["<end>"]
    lab = dict(zip(range(len(toks)), labels))
    assert labels[:3] == ["prompt"] * 3
    assert lab[toks.index("Rinse")] == "off-topic"  # first attempt scored 20
    assert lab[toks.index("Dogs")] == "off-topic"
    assert lab[toks.index("Wait,")] == "correction"
    assert lab[toks.index("right.")] == "correction"
    assert lab[toks.index("Scrub")] == "on-topic"
    assert labels[-1] == "on-topic"  # the end-of-turn token inherits the label before it
    assert [r["label"] for r in regions] == ["prompt", "off-topic", "correction", "on-topic"]
    markers = rv.restart_markers(j, offs, 3, 100)
    assert markers == [{"token": toks.index("Wait,"), "text": "Wait, that's not right"}]


def test_adjacent_restart_phrases_form_one_correction():
    resp = "Dogs bark. Wait, that's wrong. Let me try again. Scrub it."
    offs = [(0, 0)] + [(m.start(), m.end()) for m in __import__("re").finditer(r"\S+|\s", resp)]
    a, b = resp.index("Wait"), resp.index("Let")
    j = {"attempts": [{"score": 10, "start_char": 0, "end_char": a}, {"score": 90, "start_char": a, "end_char": len(resp)}],
         "restart_phrases": [{"start_char": a, "end_char": resp.index("wrong") + 5},
                             {"start_char": b, "end_char": resp.index("again") + 5}]}
    regions = rv.regions_from_judgement(j, offs, prompt_len=1)
    assert [r["label"] for r in regions] == ["prompt", "off-topic", "correction", "on-topic"]


def test_episode_summary_ratios():
    regions = [{"label": "prompt", "start": 0, "end": 4}, {"label": "off-topic", "start": 4, "end": 6},
               {"label": "correction", "start": 6, "end": 7}, {"label": "on-topic", "start": 7, "end": 9}]
    act = np.array([100.0, 1, 1, 1, 4, 4, 9, 2, 2])  # position 0 (sink) must not count
    s = rv.episode_summary(act, regions, baseline="prompt")
    assert s["regions"]["prompt"]["mean"] == pytest.approx(1.0)
    assert s["regions"]["off-topic"]["ratio"] == pytest.approx(4.0)
    assert s["after_correction"]["ratio"] == pytest.approx(2.0)
    assert "4.0x" in rv.verdict(s) and "2.0x" in rv.verdict(s)
    silent = rv.episode_summary(np.zeros(9), regions, baseline="prompt")
    assert silent["regions"]["off-topic"]["ratio"] is None
    fb = rv.episode_summary(np.array([0, 0, 0, 0, 4, 4, 9, 2, 2.0]), regions, baseline="on-topic answers",
                            baseline_value=0.5)
    assert fb["regions"]["off-topic"]["ratio"] == pytest.approx(8.0) and fb["baseline_mean"] == 0.5
    assert "mean on on-topic answers" in rv.verdict(fb)


def test_replay_regions_are_against_on_topic_activity_never_the_prompt():
    """A group that fires on the prompt no longer makes off-topic text look quiet (#13)."""
    from esr_core.latents.groups import LatentGroup

    regions = [{"label": "prompt", "start": 0, "end": 4}, {"label": "off-topic", "start": 4, "end": 6},
               {"label": "correction", "start": 6, "end": 7}, {"label": "on-topic", "start": 7, "end": 9}]
    act = np.array([0.0, 20, 20, 20, 4, 4, 9, 2, 2])  # loud on the prompt, as #1229 is on the system prompt
    g = LatentGroup(name="c", members=[1], extra={"threshold": {"value": 3.0, "how": "sum", "on_topic_mean": 0.5}})
    s = rv.region_summary(act, regions, g)
    assert s["baseline"] == rv.ON_TOPIC_BASELINE
    assert s["regions"]["off-topic"]["ratio"] == pytest.approx(8.0)  # against the prompt it would be 0.2
    assert s["after_correction"]["ratio"] == pytest.approx(4.0)
    rows = rv.region_rows({"circuit": s})
    assert all("ratio vs unsteered on-topic answers" in r for r in rows)
    bare = rv.region_summary(act, regions, LatentGroup(name="c", members=[1]))
    assert bare["regions"]["off-topic"]["ratio"] is None  # no on-topic mean: no ratio, never the prompt


def test_rank_auc_with_ties_and_derangements():
    pos = np.array([[1.0, 0.0, 2.0], [2.0, 0.0, 1.0]])
    neg = np.array([[0.0, 0.0, 1.0], [0.5, 0.0, 3.0]])
    auc = rank_auc(pos, neg)
    assert auc[0] == 1.0
    assert auc[1] == 0.5  # all ties
    assert auc[2] == pytest.approx((1 + 0 + 0.5 + 0) / 4)  # 2>1, 2<3, 1==1, 1<3
    for seed in range(5):
        d = derangement(7, seed)
        assert sorted(d.tolist()) == list(range(7)) and not np.any(d == np.arange(7))
        assert np.array_equal(d, derangement(7, seed))
    topics = ["a", "a", "b", "b", "c", "c"]
    d = derangement(6, 3, topics)
    assert all(topics[i] != topics[d[i]] for i in range(6))


def test_selection_rules():
    auc = np.array([1.0, 0.95, 0.7, 1.0])
    on = np.array([[0, 0, 1, 0.0], [0, 0.1, 0, 0]])
    off = np.array([[1, 1, 1, 2.0], [1, 1, 0, 0]])
    st = class_stats(on, off)
    m, thr = select_latents(auc, st, DetectorParams(threshold=1.0, min_size=1))
    assert m == [0, 3] and thr == 1.0
    m, thr = select_latents(auc, st, DetectorParams(threshold=1.0, min_size=3))
    assert m == [0, 3, 1] and thr == pytest.approx(0.95)  # relaxed one step
    m, _ = select_latents(auc, st, DetectorParams(rule="strict", strict_min_off_freq=0.8))
    assert m == [0]  # latent 3 fires on only half the off-topic pairs


def test_conditions_share_prompt_seed_and_sampling():
    base = GenerationSpec(prompt="How do I boil an egg?", watch=[1, 2], max_new_tokens=8, seed=7, temperature=0.6)
    dis = Intervention(latent=40, mode="add", strength=8.0)
    circ = LatentGroup(name="resistance circuit", members=[3, 4, 5])
    conds = build_conditions(base, dis, circ, d_sae=100, random_seed=1)
    keys = [c.key for c in conds]
    assert keys == ["no_steering", "steering", "meta_prompt", "detector_ablation", "random_ablation"]
    for c in conds:
        assert c.spec.seed == 7 and c.spec.temperature == 0.6 and c.spec.max_new_tokens == 8
        assert c.spec.runs == ("steered",) and c.judge_prompt == base.prompt
    by = {c.key: c for c in conds}
    assert by["no_steering"].spec.interventions == []
    assert by["steering"].spec.interventions == [dis]
    abl = [iv for iv in by["detector_ablation"].spec.interventions if iv.mode == "ablate"]
    assert [iv.latent for iv in abl] == [3, 4, 5] and all(iv.positions == "all" for iv in abl)
    rnd = by["random_ablation"].ablated
    assert len(rnd) == 3 and not set(rnd) & {3, 4, 5, 40}
    # the random set is reproducible from its seed
    again = build_conditions(base, dis, circ, d_sae=100, random_seed=1, keys=["random_ablation"])[0]
    assert again.ablated == rnd
    meta = by["meta_prompt"].spec
    assert meta.prompt == base.prompt and meta.meta_prompt == META_PROMPT.strip()
    assert meta.sent_prompt().endswith(META_PROMPT.strip()) and meta.sent_prompt() != base.prompt
    assert base.prompt == "How do I boil an egg?" and base.runs == ("steered", "default")  # base untouched
    assert random_latents(10, 3, 0, exclude=[0, 1], live=[0, 1, 2, 3, 4]) == [2, 3, 4]
    with pytest.raises(BadInput):
        random_latents(10, 4, 0, exclude=[0, 1], live=[0, 1, 2, 3, 4])
    with pytest.raises(BadInput):
        build_conditions(base, dis, None, d_sae=100, keys=["detector_ablation"])
