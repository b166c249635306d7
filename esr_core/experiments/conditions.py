"""One-click experimental conditions on one prompt and one seed (ESR_METHOD.md sec. 5, 7).

Every condition is a :class:`GenerationSpec` built from the same base spec (prompt, seed,
sampling settings), so a trial can be replayed exactly under another condition and any
difference comes from the condition alone (arXiv 2602.06941 replays baseline trials with the
detectors ablated). Each spec has one run, ``steered``, carrying the condition's edits.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from esr_core.errors import BadInput
from esr_core.steering.spec import GenerationSpec
from esr_core.steering.interventions import Intervention

META_PROMPT = "If you notice yourself going off-topic, stop and force yourself to get back on track."
CONDITION_KEYS = ("no_steering", "steering", "circuit_ablated", "random_ablated", "meta_prompt")
CONDITION_LABELS = {
    "no_steering": "No steering",
    "steering": "Steering",
    "circuit_ablated": "Steering + circuit ablated",
    "random_ablated": "Steering + random latents ablated",
    "meta_prompt": "Steering + meta-prompt",
}


@dataclass
class Condition:
    key: str
    label: str
    spec: GenerationSpec
    judge_prompt: str  # the prompt to judge against (the base prompt, even when a meta-prompt is appended)
    ablated: list[int] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return {"key": self.key, "label": self.label, "spec": self.spec.to_dict(), "judge_prompt": self.judge_prompt,
                "ablated": list(self.ablated), "note": self.note}


def random_latents(d_sae: int, size: int, seed: int, exclude: Sequence[int] = (),
                   live: Sequence[int] | None = None) -> list[int]:
    """``size`` distinct latents drawn with ``seed`` from the live ones (all if unknown), minus ``exclude``."""
    ex = {int(i) for i in exclude}
    pool = sorted({int(i) for i in (live if live is not None else range(d_sae))} - ex)
    if size > len(pool):
        raise BadInput(f"Cannot draw {size} random latents from {len(pool)} candidates")
    rng = np.random.default_rng(int(seed))
    return sorted(int(i) for i in rng.choice(pool, size=size, replace=False))


def _with(base: GenerationSpec, interventions: list[Intervention], prompt: str | None = None) -> GenerationSpec:
    s = copy.deepcopy(base)
    s.interventions = list(interventions)
    s.default_interventions = []
    s.runs = ("steered",)
    if prompt is not None:
        s.prompt = prompt
    return s


def ablations(latents: Sequence[int]) -> list[Intervention]:
    return [Intervention(latent=int(i), mode="ablate", positions="all") for i in latents]


def build_conditions(base: GenerationSpec, distractor: Intervention | Sequence[Intervention], circuit: dict | None,
                     d_sae: int, live: Sequence[int] | None = None, random_seed: int = 0,
                     meta_prompt: str = META_PROMPT, keys: Sequence[str] = CONDITION_KEYS) -> list[Condition]:
    """The one-click conditions for ``base`` (same prompt, seed and sampling) and a distractor steering.

    ``circuit`` is the detector group (members ablated at every position); the random control
    ablates as many live latents (drawn with ``random_seed``, never a member or the distractor).
    The meta-prompt condition appends ``meta_prompt`` to the prompt and records the base prompt
    as the one to judge against.
    """
    dis = [distractor] if isinstance(distractor, Intervention) else list(distractor)
    if not dis:
        raise BadInput("Give the distractor steering (an add intervention)")
    unknown = [k for k in keys if k not in CONDITION_KEYS]
    if unknown:
        raise BadInput(f"Unknown condition(s) {unknown}; known: {', '.join(CONDITION_KEYS)}")
    base = copy.deepcopy(base).validate()
    members = [int(i) for i in (circuit or {}).get("members", [])]
    out: list[Condition] = []
    for k in keys:
        lab = CONDITION_LABELS[k]
        if k == "no_steering":
            out.append(Condition(k, lab, _with(base, []), base.prompt))
        elif k == "steering":
            out.append(Condition(k, lab, _with(base, dis), base.prompt))
        elif k == "circuit_ablated":
            if not members:
                raise BadInput("No resistance circuit for this model and SAE: run `esr-lab detectors find` first")
            out.append(Condition(k, lab, _with(base, dis + ablations(members)), base.prompt, ablated=members,
                                 note=f"{len(members)} detector latents clamped to 0 at every position"))
        elif k == "random_ablated":
            if not members:
                raise BadInput("The random control needs the circuit's size: run `esr-lab detectors find` first")
            rnd = random_latents(d_sae, len(members), random_seed, exclude=members + [d.latent for d in dis], live=live)
            out.append(Condition(k, lab, _with(base, dis + ablations(rnd)), base.prompt, ablated=rnd,
                                 note=f"{len(rnd)} random live latents (seed {random_seed}) clamped to 0"))
        elif k == "meta_prompt":
            prompt = base.prompt.rstrip() + " " + meta_prompt.strip()
            out.append(Condition(k, lab, _with(base, dis, prompt=prompt), base.prompt,
                                 note=f"meta-prompt appended: {meta_prompt.strip()!r}; judged against the base prompt"))
    return out
