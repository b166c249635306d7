"""Calibration sets for the offline judge, built from our prompt set, and their score summary.

The judge's constants were chosen so that, on these sets, the default model's own
unsteered answers score 80-95 on average while another prompt's answer (a derangement),
degenerate text and pure distractor text score under 25. The sets and the resulting scores
ship in ``assets/judge/`` so the claim can be checked (tests do) and redone after any change
(``esr-lab prompts calibrate``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from esr_core.io import atomic_write_json, atomic_write_text
from esr_core.judge.prompts import load_default_answer_records, load_prompts
from esr_core.judge.scoring import JUDGE_CONSTANTS, JUDGE_ID, score_many
from esr_core.paths import ASSETS_DIR

JUDGE_ASSETS = ASSETS_DIR / "judge"
DISTRACTORS_PATH = JUDGE_ASSETS / "distractors.json"
SCORES_PATH = JUDGE_ASSETS / "calibration_scores.jsonl"
SUMMARY_PATH = JUDGE_ASSETS / "calibration_summary.json"

DERANGEMENT_SEEDS = (0, 1, 2)

_JUNK_ALPHABET = "#@%&*+=/\\|<>[]{}0123456789~^_;:"


def derangement(n: int, seed: int) -> list[int]:
    """A permutation with no fixed point (rejection sampling, fixed seed)."""
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return [int(x) for x in p]


def load_distractors() -> list[dict]:
    return json.loads(Path(DISTRACTORS_PATH).read_text(encoding="utf-8"))


def _first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text.strip(), re.DOTALL)
    return (m.group(1) if m else text.strip()[:120]).strip()


def degenerate_variants(prompt: str, answer: str, idx: int) -> dict[str, str]:
    """Three kinds of broken output a heavily steered small model produces."""
    words = re.findall(r"[A-Za-z]+", answer)
    phrase = " ".join(words[5:9]) if len(words) >= 9 else "and the and the"
    loop = _first_sentence(answer) + " " + " ".join([phrase] * 30)
    key = max(re.findall(r"[A-Za-z]+", prompt), key=len).lower()
    word = " ".join([key] * 60)
    rng = np.random.default_rng(1000 + idx)
    junk = "".join(rng.choice(list(_JUNK_ALPHABET + "  "), size=300))
    return {"degenerate_loop": loop, "degenerate_word": word, "degenerate_junk": junk}


def build_sets(prompts: list[dict], answers: dict[str, str], distractors: list[dict]) -> list[dict]:
    """Every calibration item: ``{"set", "prompt_id", "prompt", "text", "distractor", "source"}``."""
    items: list[dict] = []
    ids = [p["id"] for p in prompts if p["id"] in answers]
    by_id = {p["id"]: p for p in prompts}
    for i, pid in enumerate(ids):
        items.append({"set": "own", "prompt_id": pid, "prompt": by_id[pid]["prompt"],
                      "text": answers[pid], "distractor": None, "source": pid})
    for seed in DERANGEMENT_SEEDS:
        perm = derangement(len(ids), seed)
        for i, pid in enumerate(ids):
            src = ids[perm[i]]
            items.append({"set": "deranged", "prompt_id": pid, "prompt": by_id[pid]["prompt"],
                          "text": answers[src], "distractor": None, "source": f"{src} (seed {seed})"})
    for i, pid in enumerate(ids):
        for kind, text in degenerate_variants(by_id[pid]["prompt"], answers[pid], i).items():
            items.append({"set": kind, "prompt_id": pid, "prompt": by_id[pid]["prompt"], "text": text,
                          "distractor": None, "source": pid})
    for i, pid in enumerate(ids):
        d = distractors[i % len(distractors)]
        items.append({"set": "distractor_text", "prompt_id": pid, "prompt": by_id[pid]["prompt"],
                      "text": d["text"], "distractor": d["label"], "source": d["id"]})
        # half an answer, then a drift into the distractor: the typical steered first attempt
        sents = re.split(r"(?<=[.!?])\s+", answers[pid].strip())
        head = " ".join(sents[:max(1, len(sents) // 2)])
        items.append({"set": "drifted", "prompt_id": pid, "prompt": by_id[pid]["prompt"],
                      "text": head + " " + d["text"], "distractor": d["label"], "source": f"{pid}+{d['id']}"})
    return items


def score_items(items: list[dict]) -> list[float]:
    return [s for s, _ in score_many([(it["prompt"], it["text"], it["distractor"]) for it in items])]


def summarise(items: list[dict], scores: list[float]) -> dict:
    out: dict[str, dict] = {}
    for name in dict.fromkeys(it["set"] for it in items):
        v = np.array([s for it, s in zip(items, scores) if it["set"] == name], dtype=float)
        out[name] = {"n": int(len(v)), "mean": round(float(v.mean()), 1),
                     "p10": round(float(np.percentile(v, 10)), 1), "p90": round(float(np.percentile(v, 90)), 1),
                     "min": round(float(v.min()), 1), "max": round(float(v.max()), 1)}
    return out


def run_calibration(write: bool = True) -> dict:
    """Score all calibration sets with the current judge; optionally rewrite the assets."""
    prompts = load_prompts()
    recs = load_default_answer_records()
    answers = {r["id"]: r["answer"] for r in recs}
    items = build_sets(prompts, answers, load_distractors())
    scores = score_items(items)
    summary = {"judge": JUDGE_ID, "constants": JUDGE_CONSTANTS, "answers_settings": recs[0].get("settings"),
               "derangement_seeds": list(DERANGEMENT_SEEDS), "sets": summarise(items, scores)}
    if write:
        lines = [json.dumps({k: it[k] for k in ("set", "prompt_id", "source", "distractor", "text")} | {"score": s},
                            ensure_ascii=False) for it, s in zip(items, scores)]
        atomic_write_text(SCORES_PATH, "\n".join(lines) + "\n")
        atomic_write_json(SUMMARY_PATH, summary)
    return summary
