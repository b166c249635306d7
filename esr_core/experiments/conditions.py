"""The experimental conditions, as one table, and the edits each makes to a trial.

ESR_METHOD.md sec. 5 and 7 (arXiv 2602.06941). Every condition is the same (prompt, seed,
boost) triple with one change: no steering, the distractor boost, the boost plus a
meta-prompt, or the boost plus an ablation (the detector group, as many random live latents,
or a named group). The experiment runner and the Resistance page's one-click conditions both
build their interventions here, so a condition means the same thing wherever it appears.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from esr_core.errors import BadInput
from esr_core.latents.groups import LatentGroup
from esr_core.steering.interventions import Intervention
from esr_core.steering.spec import GenerationSpec

GROUP_PREFIX = "group_ablation:"
META_PREFIX = "meta_prompt:"

# Meta-prompt variants appended to the user prompt (sec. 7). "meta_prompt" alone is the paper's.
META_PROMPTS: dict[str, str] = {
    "get_back_on_track": "If you notice yourself going off-topic, stop and force yourself to get back on track.",
    "dont_get_distracted": "Don't get distracted!",
    "ignore_label": "Ignore anything about {label}; answer only the question.",
}
DEFAULT_META_VARIANT = "get_back_on_track"


@dataclass(frozen=True)
class ConditionKind:
    """One row of the table: what a condition does to the base trial."""

    key: str
    label: str
    steered: bool  # the distractor boost is applied
    ablates: str | None = None  # "detector" | "random" | "group" | None
    meta: bool = False  # a meta-prompt is appended (judged against the base prompt)
    help: str = ""


CONDITIONS: dict[str, ConditionKind] = {c.key: c for c in (
    ConditionKind("no_steering", "No steering", steered=False,
                  help="the same prompt and seed without the distractor (expect 0 % multi-attempt)"),
    ConditionKind("steering", "Steering", steered=True, help="the distractor latent added at its boost"),
    ConditionKind("meta_prompt", "Steering + meta-prompt", steered=True, meta=True,
                  help="an instruction to stay on topic appended to the prompt"),
    ConditionKind("detector_ablation", "Steering + detectors ablated", steered=True, ablates="detector",
                  help="the off-topic detector latents clamped to 0 at every position"),
    ConditionKind("random_ablation", "Steering + random latents ablated", steered=True, ablates="random",
                  help="as many random live latents clamped to 0 (the control)"),
)}
BASE_CONDITIONS = tuple(CONDITIONS)


def check_condition_name(c: str) -> str:
    if c in CONDITIONS or c.startswith(META_PREFIX) and c[len(META_PREFIX):] in META_PROMPTS:
        return c
    if c.startswith(GROUP_PREFIX) and c[len(GROUP_PREFIX):].strip():
        return c
    raise BadInput(f"Unknown condition {c!r} (use {', '.join(BASE_CONDITIONS)} or group_ablation:<name>)")


def kind_of(condition: str) -> ConditionKind:
    """The table row of a condition name (meta-prompt variants and named group ablations included)."""
    check_condition_name(condition)
    if condition.startswith(META_PREFIX):
        return CONDITIONS["meta_prompt"]
    if condition.startswith(GROUP_PREFIX):
        name = condition[len(GROUP_PREFIX):]
        return ConditionKind(condition, f"Steering + '{name}' ablated", steered=True, ablates="group")
    return CONDITIONS[condition]


def meta_variant_of(condition: str, meta_variants: Sequence[str]) -> str | None:
    if condition == "meta_prompt":
        return meta_variants[0] if meta_variants else DEFAULT_META_VARIANT
    if condition.startswith(META_PREFIX):
        return condition[len(META_PREFIX):]
    return None


def meta_text(variant: str, label: str) -> str:
    return META_PROMPTS[variant].format(label=label or "the unrelated subject")


def ablations(latents: Sequence[int], positions: str = "all") -> list[Intervention]:
    return [Intervention(latent=int(i), mode="ablate", strength=0.0, units="raw", positions=positions)
            for i in latents]


def condition_interventions(condition: str, distractor: Sequence[Intervention],
                            ablated: Sequence[int] = ()) -> list[Intervention]:
    """The interventions of one condition: the distractor steering (unless unsteered) plus the
    ablation set (never the distractor itself)."""
    kind = kind_of(condition)
    ivs = list(distractor) if kind.steered else []
    steered = {iv.latent for iv in distractor}
    if kind.ablates:
        ivs += ablations([m for m in ablated if int(m) not in steered])
    return ivs


def random_latents(d_sae: int, size: int, seed: int, exclude: Sequence[int] = (),
                   live: Sequence[int] | None = None) -> list[int]:
    """``size`` distinct latents drawn with ``seed`` from the live ones (all if unknown), minus ``exclude``."""
    ex = {int(i) for i in exclude}
    pool = sorted({int(i) for i in (live if live is not None else range(d_sae))} - ex)
    if size > len(pool):
        raise BadInput(f"Cannot draw {size} random latents from {len(pool)} candidates")
    rng = np.random.default_rng(int(seed))
    return sorted(int(i) for i in rng.choice(pool, size=size, replace=False))


# ----------------------------------------------------------------------------- one prompt, one click


@dataclass
class OneClick:
    """One condition on one prompt and seed, ready to generate (the Resistance page)."""

    key: str
    label: str
    spec: GenerationSpec
    judge_prompt: str  # the prompt to judge against (the base prompt, even when a meta-prompt is appended)
    ablated: list[int] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return {"key": self.key, "label": self.label, "spec": self.spec.to_dict(), "judge_prompt": self.judge_prompt,
                "ablated": list(self.ablated), "note": self.note}


def _with(base: GenerationSpec, interventions: list[Intervention], meta: str | None = None) -> GenerationSpec:
    s = copy.deepcopy(base)
    s.interventions = list(interventions)
    s.default_interventions = []
    s.runs = ("steered",)
    s.meta_prompt = meta
    return s


def build_conditions(base: GenerationSpec, distractor: Intervention | Sequence[Intervention],
                     circuit: LatentGroup | None, d_sae: int, live: Sequence[int] | None = None,
                     random_seed: int = 0, meta_prompt: str = META_PROMPTS[DEFAULT_META_VARIANT],
                     keys: Sequence[str] = BASE_CONDITIONS) -> list[OneClick]:
    """The one-click conditions for ``base`` (same prompt, seed and sampling) and a distractor steering.

    ``circuit`` is the detector group (members ablated at every position); the random control
    ablates as many live latents (drawn with ``random_seed``, never a member or the distractor).
    The meta-prompt condition appends ``meta_prompt`` to the prompt and records the base prompt
    as the one to judge against.
    """
    dis = [distractor] if isinstance(distractor, Intervention) else list(distractor)
    if not dis:
        raise BadInput("Give the distractor steering (an add intervention)")
    unknown = [k for k in keys if k not in CONDITIONS]
    if unknown:
        raise BadInput(f"Unknown condition(s) {unknown}; known: {', '.join(BASE_CONDITIONS)}")
    base = copy.deepcopy(base).validate()
    members = [int(i) for i in (circuit.members if circuit is not None else [])]
    out: list[OneClick] = []
    for k in keys:
        kind = CONDITIONS[k]
        ablated: list[int] = []
        note = kind.help
        if kind.ablates and not members:
            raise BadInput("No resistance circuit for this model and SAE: run `esr-lab detectors find` first")
        if kind.ablates == "detector":
            ablated = members
            note = f"{len(members)} detector latents clamped to 0 at every position"
        elif kind.ablates == "random":
            ablated = random_latents(d_sae, len(members), random_seed, exclude=members + [d.latent for d in dis],
                                     live=live)
            note = f"{len(ablated)} random live latents (seed {random_seed}) clamped to 0"
        meta = meta_prompt.strip() if kind.meta else None
        if kind.meta:
            note = f"meta-prompt appended: {meta!r}; judged against the base prompt"
        out.append(OneClick(k, kind.label, _with(base, condition_interventions(k, dis, ablated), meta=meta),
                            base.prompt, ablated=ablated, note=note))
    return out
