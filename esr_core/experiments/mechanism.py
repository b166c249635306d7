"""Does the circuit notice before the model says so? Lead times over a run's recoveries.

For every recovery (an ESR trial of a steered condition) the answer is replayed through the
model with the trial's own interventions, the circuit's activity is read per token, and its
first threshold crossing after the prompt is compared with the first restart phrase: the share
of recoveries where the crossing comes first and the median lead in tokens (positive: the
circuit crossed before the restart). The paper reports this per-token view for one example;
here it is measured over all recoveries, whatever it shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from esr_core.experiments.cases import esr_cases, lab_setup, trial_of
from esr_core.experiments.metrics import trial_table_flags
from esr_core.experiments.spec import trial_interventions
from esr_core.experiments.store import load_spec, load_trials
from esr_core.jobs import Progress, check_cancel, report_fraction
from esr_core.judge.scoring import judge_response
from esr_core.latents.groups import LatentGroup
from esr_core.resistance.live import LiveResistance, judged_overlay
from esr_core.resistance.view import replay_episode
from esr_core.steering.interventions import Intervention
from esr_core.steering.spec import GenerationSpec

STEERED_CONDITIONS = ("steering",)


def _recoveries(run_dir, conditions, limit):
    """The run's spec and its ESR trials in ``conditions`` (the first ``limit``)."""
    cases = esr_cases(trial_table_flags(load_trials(run_dir)))
    cases = cases[cases["condition"].isin(list(conditions))]
    return load_spec(run_dir), (cases.head(limit) if limit is not None else cases)


def recovery_leads(run_dir: str | Path, engine, circuit: LatentGroup, conditions=STEERED_CONDITIONS,
                   limit: int | None = None, progress: Progress | None = None, cancel=None) -> dict:
    """Per recovery: first crossing, first restart token and the lead; and their summary."""
    spec, cases = _recoveries(run_dir, conditions, limit)
    rows = []
    for k, (_, r) in enumerate(cases.iterrows()):
        check_cancel(cancel, "Lead times")
        ivs = trial_interventions(spec, trial_of(r.to_dict()))
        rep = replay_episode(engine, str(r["prompt"]), str(r["response"]), circuit, steering=ivs)
        first = int(rep["prompt_len"])
        crossings = [c for c in rep.get("crossings", []) if c >= first]
        restarts = [m["token"] for m in rep["markers"] if m["token"] >= first]
        cross = crossings[0] if crossings else None
        restart = restarts[0] if restarts else None
        rows.append({"key": r.get("key"), "latent": int(r["latent"]), "prompt_id": r.get("prompt_id"),
                     "first_crossing": None if cross is None else cross - first,
                     "first_restart": None if restart is None else restart - first,
                     "lead_tokens": None if cross is None or restart is None else restart - cross})
        report_fraction(progress, "lead times", (k + 1) / max(1, len(cases)), f"{k + 1}/{len(cases)} recoveries")
    return {"n_recoveries": len(rows), "rows": rows, **lead_summary(rows)}


def lead_summary(rows: list[dict]) -> dict:
    """Share of recoveries whose crossing precedes the restart, and the median lead."""
    both = [r["lead_tokens"] for r in rows if r["lead_tokens"] is not None]
    return {"n_with_crossing_and_restart": len(both),
            "n_without_crossing": sum(1 for r in rows if r["first_crossing"] is None),
            "crossing_first_share": (sum(1 for x in both if x > 0) / len(both)) if both else None,
            "median_lead_tokens": float(np.median(both)) if both else None}


def demo_candidates(run_dir: str | Path, engine, circuit: LatentGroup, conditions=STEERED_CONDITIONS,
                    limit: int | None = None, progress: Progress | None = None, cancel=None) -> list[dict]:
    """The run's recoveries rerun the way the steering lab runs them (one stream, same seed and
    set-up), each with what the lab would show: the verdict, the circuit's live crossing and the
    restart tokens. Best first: recovers live, crosses before the restart, restarts after
    drifting (a first attempt of at least a sentence), largest score gain."""
    spec, cases = _recoveries(run_dir, conditions, limit)
    out = []
    for k, (_, r) in enumerate(cases.iterrows()):
        check_cancel(cancel, "Demo search")
        setup = lab_setup(spec, r.to_dict())
        watch = list(dict.fromkeys([setup["latent"], *circuit.members]))
        gs = GenerationSpec(prompt=setup["prompt"], meta_prompt=setup.get("meta_prompt"), watch=watch,
                            interventions=[Intervention.from_dict(d) for d in setup["interventions"]],
                            seed=int(setup["seed"]), temperature=float(setup["temperature"]),
                            max_new_tokens=int(setup["max_new_tokens"]),
                            repetition_penalty=float(setup["repetition_penalty"]), sampler=setup["sampler"])
        res = engine.generate(gs)["steered"]
        j = judge_response(setup["prompt"], res.text)
        ov = judged_overlay(j, res.pieces)
        tr = LiveResistance.replay(circuit, res.pieces, res.acts, res.watch)
        restart = tr.restart_tokens[0] if tr.restart_tokens else None
        scores = [float(s) for s in ov["scores"] if s is not None]
        first_len = len(j["attempts"][0]["attempt_text"].split()) if j["attempts"] else 0
        out.append({"setup": {**setup, "watch": watch}, "verdict": ov["verdict"], "scores": scores,
                    "crossing": tr.crossing, "restart": restart, "first_attempt_words": first_len,
                    "text": res.text, "key": r.get("key")})
        report_fraction(progress, "demo search", (k + 1) / max(1, len(cases)), f"{k + 1}/{len(cases)} recoveries")

    def rank(c):
        live = c["verdict"] == "esr"
        ordered = c["crossing"] is not None and c["restart"] is not None and c["crossing"] < c["restart"]
        gain = (c["scores"][-1] - c["scores"][0]) if len(c["scores"]) > 1 else 0.0
        return (not live, not ordered, c["first_attempt_words"] < 12, -gain)

    return sorted(out, key=rank)


def circuit_separation(run_dir: str | Path, engine, circuit: LatentGroup, n: int = 12, off_topic_below: float = 30.0,
                       progress: Progress | None = None, cancel=None) -> dict:
    """How often the circuit crosses its threshold on a run's steered off-topic answers vs unsteered ones.

    The first ``n`` steered trials whose first attempt the judge scored off-topic, and the first
    ``n`` no-steering trials, each replayed with its own interventions (the live condition:
    steering on), counted over response tokens only. The run's prompts are the evaluation
    prompts, never those a token-level circuit was searched on.
    """
    spec = load_spec(run_dir)
    t = load_trials(run_dir)
    steered = t[(t["condition"] == "steering") & (t["first_score"] < off_topic_below)].head(n)
    plain = t[t["condition"] == "no_steering"].head(n)
    thr = circuit.threshold_value("sum")
    out: dict = {"threshold": thr, "members": list(circuit.members)}
    total = len(steered) + len(plain)
    done = 0
    for name, rows in (("steered_off_topic", steered), ("unsteered", plain)):
        crossed = []
        for _, r in rows.iterrows():
            check_cancel(cancel, "Circuit separation")
            ivs = trial_interventions(spec, trial_of(r.to_dict()))
            rep = replay_episode(engine, str(r["prompt"]), str(r["response"]), circuit, steering=ivs,
                                 judgement={"attempts": []})
            first = int(rep["prompt_len"])
            crossed.append(any(c >= first for c in rep.get("crossings", [])))
            done += 1
            report_fraction(progress, "separation", done / max(1, total), f"{done}/{total} answers")
        out[name] = {"crossed": int(sum(crossed)), "n": len(crossed)}
    return out
