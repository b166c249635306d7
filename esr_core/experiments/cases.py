"""Single trials of a run: what each ESR case actually is, and how to rerun any trial in the lab.

A rate computed from one or two trials says less than the trials themselves: "improved after a
restart" only means the last attempt scored higher than the first, and 0 -> 3.6 of 100 is a
restart that drifts again, not a recovery. So a headline with few ESR cases describes each one,
and any trial opens in the steering lab with the prompt, interventions, meta-prompt and seed
it ran with.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import pandas as pd

from esr_core.experiments.conditions import CONDITIONS, kind_of
from esr_core.experiments.spec import ExperimentSpec, Trial, prompt_for, trial_interventions

ON_TASK = 50.0  # a last attempt at or above this (of 100) answers the task: a recovery
MAX_DESCRIBED = 3  # more ESR cases than this: the rate speaks for itself


def esr_cases(flagged: pd.DataFrame) -> pd.DataFrame:
    """The trials counted as ESR (valid, several attempts, last score above the first)."""
    if not len(flagged) or not {"valid", "multi_attempt", "improved"} <= set(flagged.columns):
        return flagged.iloc[0:0]
    return flagged[flagged["valid"].astype(bool) & flagged["multi_attempt"].astype(bool)
                   & flagged["improved"].astype(bool)]


def restart_words(attempts: Any, limit: int = 60) -> str:
    """The first sentence of the last attempt: the words the model restarted with."""
    if isinstance(attempts, str):
        try:
            attempts = json.loads(attempts)
        except ValueError:
            return ""
    if not isinstance(attempts, list) or len(attempts) < 2 or not isinstance(attempts[-1], Mapping):
        return ""
    text = str(attempts[-1].get("attempt_text", "")).strip()
    first = re.split(r"(?<=[.!?])\s|\n", text, maxsplit=1)[0].strip()
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


def describe_case(row: Mapping) -> str:
    """One sentence: which trial, how it restarted, and whether the restart reached the task."""
    label = kind_of(str(row["condition"])).label if str(row["condition"]) in CONDITIONS else str(row["condition"])
    first, last = float(row["first_score"]), float(row["last_score"])
    words = restart_words(row.get("attempts"))
    s = (f"{label} on latent #{int(row['latent'])}"
         + (f" ({row['latent_label']})" if row.get("latent_label") else "")
         + f", prompt “{row.get('prompt', '')}”: restarts"
         + (f" with “{words}”" if words else "") + f" and scores {first:.3g} → {last:.3g} of 100")
    if last >= ON_TASK:
        return s + ": the last attempt answers the task, a real recovery"
    return (s + f": the last attempt is still off-task (below {ON_TASK:.0f}), so this is a restart that drifts "
            "again, counted as ESR only because its score rose")


def cases_sentence(flagged: pd.DataFrame, limit: int = MAX_DESCRIBED) -> str:
    """What the run's few ESR cases are, for the headline; '' when there are none or many."""
    cases = esr_cases(flagged)
    n = len(cases)
    if n == 0 or n > limit:
        return ""
    parts = [describe_case(r) for _, r in cases.iterrows()]
    if n == 1:
        return "The only ESR trial: " + parts[0] + "."
    return f"The {n} ESR trials: " + "; ".join(f"({k + 1}) {p}" for k, p in enumerate(parts)) + "."


def trial_of(row: Mapping) -> Trial:
    abl = row.get("ablation_seed")
    return Trial(key=str(row.get("key", "")), condition=str(row["condition"]), latent=int(row["latent"]),
                 prompt_id=str(row.get("prompt_id", "")), seed=int(row["seed"]), boost=float(row["boost"]),
                 level=int(row.get("level", 0) or 0), rep=int(row.get("rep", 0) or 0),
                 ablation_seed=None if abl is None or pd.isna(abl) else int(abl))


def lab_setup(spec: ExperimentSpec, row: Mapping) -> dict:
    """Everything the steering lab needs to rerun one trial: the base prompt and meta-prompt,
    the interventions (distractor boost in raw units plus the condition's ablations), the
    distractor watched, the seed and sampling. Batching in the experiment can change late tokens
    of a sampled answer, so the lab's text can differ after a while; the set-up is identical."""
    t = trial_of(row)
    base = str(row.get("prompt") or "")
    sent, variant = prompt_for(spec, t.condition, t.latent, base)
    meta = sent[len(base):].strip() if variant else None
    ivs = trial_interventions(spec, t)
    return {"model": spec.model, "prompt": base, "meta_prompt": meta, "meta_variant": variant,
            "interventions": [iv.to_dict() for iv in ivs], "latent": t.latent, "watch": [t.latent],
            "seed": t.seed, "temperature": float(spec.temperature), "max_new_tokens": int(spec.max_new_tokens),
            "repetition_penalty": float(spec.repetition_penalty), "top_k": 0, "sampler": spec.sampler,
            "source": f"the {t.condition} trial on #{t.latent} (prompt {t.prompt_id}, seed {t.seed}) of run "
                      f"'{spec.name}'"}
