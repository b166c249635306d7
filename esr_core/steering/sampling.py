"""Choosing the next token: repetition penalty (as Hugging Face applies it), temperature, top-p.

Temperature 0 is greedy. One ``torch.Generator`` per row, seeded from the request, makes a
sampled answer replayable exactly (the steered and default runs share the seed).
"""

from __future__ import annotations

import torch

from esr_core.steering.spec import GenerationSpec


def sample_next(logits: torch.Tensor, history: list[int], spec: GenerationSpec, gen: torch.Generator) -> int:
    """Repetition penalty (as HF applies it), temperature, top-p; temperature 0 is greedy."""
    x = logits.clone()
    if spec.repetition_penalty != 1.0 and history:
        idx = torch.tensor(sorted(set(history)), dtype=torch.long, device=x.device)
        s = x[idx]
        x[idx] = torch.where(s < 0, s * spec.repetition_penalty, s / spec.repetition_penalty)
    if spec.temperature <= 0:
        return int(torch.argmax(x))
    x = x / spec.temperature
    probs = torch.softmax(x, dim=-1)
    if spec.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        cum = torch.cumsum(sp, dim=-1)
        drop = (cum - sp) > spec.top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, si, sp)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))
