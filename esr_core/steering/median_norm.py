"""The median residual norm at a hook: the unit of ``norm`` steering strengths.

SAEs that record it (``esr_meta.json``) do not need this; others are measured once on a few
sentences of our own prose and cached, so every engine on the same (model, hook, SAE) agrees.
"""

from __future__ import annotations

import torch

from esr_core.io import atomic_write_json, read_json_or
from esr_core.models.sae import norm_cache_path

# Reference text for the median residual norm of SAEs that do not record one (our own prose).
REFERENCE_TEXT = [
    "The kettle clicked off and steam curled up towards the kitchen window while the radio read the morning news.",
    "To change a bicycle tyre, first release the brake, open the quick-release lever and lift the wheel out of the frame.",
    "In 1887 the town council voted to build a new library, and the first books arrived by train the following spring.",
    "def mean(values):\n    return sum(values) / len(values) if values else 0.0",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts of plant cells.",
    "She said she would call back after the meeting, but the phone stayed silent all afternoon.",
]


def measure_median_norm(engine) -> float:
    """The median residual norm at the engine's hook over our reference text (position 0
    excluded), cached per (model, hook, SAE) in the user cache: the unit of ``norm`` strengths."""
    path = norm_cache_path(engine.model.name, engine.hook_name + "_" + engine.sae.key)
    cached = read_json_or(path, {})
    if isinstance(cached, dict) and isinstance(cached.get("median_resid_norm"), (int, float)):
        return float(cached["median_resid_norm"])
    norms = []
    for text in REFERENCE_TEXT:
        ids = engine.model.tokenizer(text, return_tensors="pt").input_ids.to(engine.device)
        h = engine.residual(ids)[1:]
        norms.append(h.norm(dim=-1))
    med = float(torch.cat(norms).median())

    atomic_write_json(path, {"median_resid_norm": med, "hook": engine.hook_name})
    return med
