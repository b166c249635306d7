"""Form input into validated requests: latent ids, strengths, interventions, the generation spec.

Every parse raises :class:`~esr_core.errors.BadInput` with one clear line, so a page shows
the reason next to the widget and runs nothing.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from esr_core.errors import BadInput
from esr_core.latents.groups import LatentGroup
from esr_core.steering.interventions import MODES, POSITIONS, UNITS, Intervention, validate
from esr_core.steering.spec import GenerationSpec


def parse_latent(text: Any, d_sae: int) -> int:
    s = str(text).strip().lstrip("#")
    try:
        i = int(s)
    except ValueError:
        raise BadInput(f"'{text}' is not a latent id (a whole number like 123)") from None
    if not 0 <= i < d_sae:
        raise BadInput(f"Latent {i} is out of range: this SAE has latents 0..{d_sae - 1}")
    return i


def parse_strength(text: Any) -> float:
    try:
        v = float(str(text).strip())
    except ValueError:
        raise BadInput(f"'{text}' is not a number") from None
    if math.isnan(v) or math.isinf(v):
        raise BadInput(f"Strength must be a finite number, got {text}")
    return v


def make_intervention(latent: Any, mode: str, strength: Any, units: str, positions: str, d_sae: int) -> Intervention:
    """Validated intervention from form input; raises BadInput with one clear line."""
    if mode not in MODES or units not in UNITS or positions not in POSITIONS:
        raise BadInput("Unknown mode, units or positions")
    iv = Intervention(latent=parse_latent(latent, d_sae), mode=mode,
                      strength=0.0 if mode == "ablate" else parse_strength(strength), units=units, positions=positions)
    return validate(iv, d_sae)


def parse_watch(text: str, d_sae: int) -> list[int]:
    out = []
    for tok in str(text or "").replace(";", ",").replace(" ", ",").split(","):
        if tok.strip():
            i = parse_latent(tok, d_sae)
            if i not in out:
                out.append(i)
    return out


def watch_list(watched: Sequence[int], interventions: Sequence[Intervention], groups: Sequence[LatentGroup]) -> list[int]:
    """Everything the readout must report: watched latents, steered latents, group members."""
    out: list[int] = []
    for i in list(watched) + [iv.latent for iv in interventions] + [m for g in groups for m in g.members]:
        if int(i) not in out:
            out.append(int(i))
    return out


def build_spec(prompt: str, interventions: Sequence[Intervention], watched: Sequence[int],
               groups: Sequence[LatentGroup], d_sae: int, *, seed: int = 0, temperature: float = 0.0,
               max_new_tokens: int = 48, repetition_penalty: float = 1.1, top_k: int = 8,
               ablate_groups: Sequence[LatentGroup] = (), chat: bool = True, truncate: str = "error",
               meta_prompt: str | None = None, sampler: str = "cdf") -> GenerationSpec:
    """A validated GenerationSpec; group ablations are applied to the steered run."""
    for iv in interventions:
        validate(iv, d_sae)
    for g in groups:
        g.check(d_sae)
    ivs = list(interventions) + [a for g in ablate_groups for a in g.ablations()]
    spec = GenerationSpec(prompt=prompt or "", interventions=ivs,
                          watch=watch_list(watched, interventions, list(groups) + list(ablate_groups)),
                          top_k=top_k, temperature=float(temperature), max_new_tokens=int(max_new_tokens),
                          seed=int(seed), repetition_penalty=float(repetition_penalty), chat=chat, truncate=truncate,
                          meta_prompt=meta_prompt or None, sampler=sampler)
    return spec.validate()
