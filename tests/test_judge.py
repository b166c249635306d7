"""Offline judge: segmentation at explicit restarts only, score ordering, calibration claims, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from esr_core.errors import BadInput
from esr_core.judge.restart_phrases import find_restart_phrases, mask_literal_spans
from esr_core.judge.scoring import JUDGE_ID, RATE_DEFINITIONS, get_judge, judge_response, segment, verdict

# (response, substrings at which a new attempt must start); an empty list = one attempt
SEGMENTATION_CASES = [
    # real restarts
    ("Dogs love to play fetch in the park with a ball. Wait, that's not right. To clean a cast iron pan, "
     "rinse it with hot water and dry it.", ["Wait, that's not right"]),
    ("Paris has the Eiffel Tower and many cafes. Actually, I made a mistake. To boil an egg, put it in water.",
     ["Actually, I made a mistake"]),
    ("The ocean is full of whales and sharks swimming. Let me try again. First, gather your supplies.",
     ["Let me try again"]),
    ("Volcanoes erupt with lava and ash everywhere. Sorry, I went off topic. Back to your question: fold the "
     "corners into each other.", ["Sorry, I went off topic"]),
    ("Basketball players dribble the ball up the court.\n\nI got off track there. Let's start over. "
     "Write the email with a clear subject line.", ["I got off track"]),
    ("Rockets carry astronauts into orbit every year. Oops! Let me try again: rinse the rice first.",
     ["Oops"]),
    ("Jazz musicians improvise over a bass line. Scratch that. Measure the radius and square it.",
     ["Scratch that"]),
    ("Knights rode horses into tournaments at the castle. I'd like to revise my answer. Use a whetstone "
     "at a 20 degree angle.", ["I'd like to revise my answer"]),
    ("Dinosaurs ruled the Earth for millions of years. Hmm, let me refocus on the question. Put the "
     "seedlings in holes deeper than their pots.", ["Hmm, let me refocus"]),
    ("The Roman legions marched on paved roads. Wait, that has nothing to do with it. Start by "
     "listing your income. Then the dog barked at the mailman. Wait, that's wrong again. List your "
     "fixed costs first.", ["Wait, that has", "Wait, that's wrong"]),
    ("Turn off the power at the breaker box — wait, no, first check which switch controls the light. "
     "Then unscrew the old bulb.", ["wait, no"]),
    # restart phrase at the very start: nothing to abandon yet, so one attempt
    ("Wait, let me think. To tie a tie, drape it around your neck.", []),
    # tricky non-restarts
    ("Put the eggs in a pot of cold water. Wait for the water to boil, then simmer for six minutes. "
     "Wait until they cool before peeling.", []),
    ("In English the word 'wait' means to pause. People also say \"wait, that's not right\" when they "
     "notice an error, or \"let me try again\" after failing.", []),
    ("Actually, the best way is to use a soft brush. Scrub gently and rinse with warm water.", []),
    ("Here is a small script:\n```python\n# wait, that's not right\nprint('let me try again')\n```\n"
     "Run it with python3.", []),
    ("Steps:\n1. Wait for the pan to cool.\n2. Actually rinse it, do not soak it.\n3. Dry it on the stove.\n"
     "4. Oil it lightly.", []),
    ("If you made a mistake in the sum, start again from the top line and add each column carefully.", []),
    ("That's not right for wool sweaters, so use cold water and a gentle soap instead.", []),
    ("Hold on to the handle firmly while you pull the cord. Keep the blade away from your feet.", []),
    ("", []),
]


@pytest.mark.parametrize("response,split_at", SEGMENTATION_CASES)
def test_segmentation(response, split_at):
    spans, phrases = segment(response)
    if not response.strip():
        assert spans == [] and phrases == []
        return
    assert len(spans) == len(split_at) + 1, (spans, phrases)
    starts = [a for a, _ in spans[1:]]
    assert starts == [response.index(s) for s in split_at]
    assert spans[0][0] == 0
    # attempts tile the response (only whitespace between them)
    for (a1, b1), (a2, _) in zip(spans, spans[1:]):
        assert response[b1:a2].strip() == ""
    assert response[spans[-1][1]:].strip() == ""


def test_restart_phrase_offsets_and_kinds():
    r = "Volcanoes erupt. Sorry, I went off topic. Back to your question: fold it."
    ph = find_restart_phrases(r)
    assert [(p.text, p.kind) for p in ph] == [("Sorry, I went off topic", "refocus"),
                                              ("Back to your question", "refocus")]
    for p in ph:
        assert r[p.start_char:p.end_char] == p.text


def test_masking_keeps_length():
    t = "Say 'wait' and \"let me try again\" in `code`.\n```\nwait,\n```"
    m = mask_literal_spans(t)
    assert len(m) == len(t) and "wait" not in m and m.count("\n") == t.count("\n")


# ------------------------------------------------------------------ scores

PROMPT_EGG = "Explain how to boil an egg so the yolk stays soft."
ON_EGG = ("Place the egg gently in a small pot and cover it with cold water. Bring the water to a boil over "
          "medium heat, then lower the heat and simmer for about six minutes. Move the egg into a bowl of ice "
          "water for a minute so it stops cooking, then peel it. The white will be set and the yolk soft.")
DRIFT_EGG = ("Place the egg in a pot of cold water and heat it. Dogs are loyal companions that love to fetch a ball "
             "in the park. Puppies need training, walks and lots of play, and a golden retriever will wag its "
             "tail when its owner comes home.")
GIB_EGG = "egg egg egg egg egg egg the the the the the " * 6

PROMPT_TYRE = "Explain how to fix a flat bicycle tyre."
ON_TYRE = ("Take the wheel off the bike and use tyre levers to remove one side of the tyre. Pull out the inner "
           "tube, pump a little air into it and listen for the hole. Patch the puncture with a patch kit, check "
           "the inside of the tyre for glass or thorns, then put the tube back, refit the tyre and inflate it.")
DRIFT_TYRE = ("Remove the wheel from the bike first. The Eiffel Tower rises over Paris, and visitors queue at the "
              "Louvre to see the Mona Lisa before walking along the river Seine to a cafe for croissants.")
GIB_TYRE = "#@ 0x3f ;; ~~ 1234 //\\\\ <<>> [[ ]] %%% " * 8


@pytest.mark.parametrize("prompt,on,drift,gib,distractor", [
    (PROMPT_EGG, ON_EGG, DRIFT_EGG, GIB_EGG, "dogs and puppies"),
    (PROMPT_TYRE, ON_TYRE, DRIFT_TYRE, GIB_TYRE, "the city of Paris"),
    (PROMPT_TYRE, ON_TYRE, DRIFT_TYRE, GIB_TYRE, None),
])
def test_scores_ordered(prompt, on, drift, gib, distractor):
    s_on, s_drift, s_gib = (judge_response(prompt, t, distractor)["attempts"][0]["score"] for t in (on, drift, gib))
    assert s_on > s_drift > s_gib, (s_on, s_drift, s_gib)
    assert s_on >= 70 and s_gib < 15


def test_recovery_is_esr_and_deterministic():
    resp = DRIFT_EGG + " Wait, that's not right. Let me try again. " + ON_EGG
    j = judge_response(PROMPT_EGG, resp, "dogs and puppies")
    assert len(j["attempts"]) == 2 and j["judge"] == JUDGE_ID
    a1, a2 = j["attempts"]
    assert resp[a2["start_char"]:a2["end_char"]] == a2["attempt_text"]
    assert a2["attempt_text"].startswith("Wait, that's not right")
    assert a2["score"] > a1["score"]
    assert verdict(j) == "esr"
    assert judge_response(PROMPT_EGG, resp, "dogs and puppies") == j


def test_verdicts_and_empty():
    assert judge_response(PROMPT_EGG, "")["attempts"] == []
    assert verdict({"attempts": []}) == "none"
    assert verdict({"attempts": [{"score": 50}]}) == "single"
    assert verdict({"attempts": [{"score": 50}, {"score": 50}]}) == "multi"
    assert verdict({"attempts": [{"score": 60}, {"score": 40}]}) == "multi"
    assert verdict({"attempts": [{"score": 10}, {"score": 30}, {"score": 20}]}) == "esr"
    with pytest.raises(BadInput):
        judge_response("  ", "text")
    assert set(RATE_DEFINITIONS) == {"multi_attempt_rate", "esr_rate", "improvement_rate",
                                     "mean_score_improvement", "mean_first_attempt_score"}
    assert all(len(v) > 40 for v in RATE_DEFINITIONS.values())


def test_get_judge():
    j = get_judge("offline")
    assert j.judge_id == JUDGE_ID
    assert len(j(PROMPT_TYRE, ON_TYRE)["attempts"]) == 1
    with pytest.raises(BadInput):
        get_judge("nope")


# ------------------------------------------------------------------ calibration on the shipped answers

def test_calibration_claims_hold():
    from esr_core.judge.calibration import build_sets, derangement, load_distractors, score_items, summarise
    from esr_core.judge.prompts import load_default_answers, load_prompts

    prompts = load_prompts()
    answers = load_default_answers()
    assert len(prompts) >= 40 and set(answers) == {p["id"] for p in prompts}
    items = [it for it in build_sets(prompts, answers, load_distractors())
             if it["set"] != "deranged" or it["source"].endswith("(seed 0)")]
    summ = summarise(items, score_items(items))
    assert 80 <= summ["own"]["mean"] <= 95, summ["own"]
    assert summ["deranged"]["mean"] < 25, summ["deranged"]
    for k in ("degenerate_loop", "degenerate_word", "degenerate_junk", "distractor_text"):
        assert summ[k]["mean"] < 25, (k, summ[k])
    assert summ["own"]["mean"] > summ["drifted"]["mean"] > summ["distractor_text"]["mean"]
    p = derangement(10, 3)
    assert sorted(p) == list(range(10)) and all(i != v for i, v in enumerate(p))


def test_shipped_calibration_scores_match_summary():
    from esr_core.judge.calibration import SCORES_PATH, SUMMARY_PATH

    summary = json.loads(SUMMARY_PATH.read_text())
    rows = [json.loads(line) for line in SCORES_PATH.read_text().splitlines() if line.strip()]
    own = np.array([r["score"] for r in rows if r["set"] == "own"])
    assert abs(own.mean() - summary["sets"]["own"]["mean"]) < 0.06
    assert 80 <= summary["sets"]["own"]["mean"] <= 95
    assert summary["sets"]["deranged"]["mean"] < 25 and summary["judge"] == JUDGE_ID


# ------------------------------------------------------------------ CLI

def _cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "esr_core.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_json_and_text():
    resp = DRIFT_TYRE + " Sorry, I went off topic. " + ON_TYRE
    r = _cli("judge", "--prompt", PROMPT_TYRE, "--response", resp, "--distractor", "the city of Paris", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["judge"] == JUDGE_ID and j["verdict"] == "esr"
    assert [set(a) for a in j["attempts"]] == [{"attempt_text", "score", "start_char", "end_char"}] * 2
    assert j["restart_phrases"][0]["text"] == "Sorry, I went off topic"
    r = _cli("judge", "--prompt", PROMPT_TYRE, "--response", ON_TYRE)
    assert r.returncode == 0 and "attempt 1: score" in r.stdout and "verdict: single" in r.stdout
    r = _cli("judge", "--prompt", "", "--response", "x")
    assert r.returncode == 2 and r.stderr.startswith("esr-lab: error:") and len(r.stderr.strip().splitlines()) == 1
