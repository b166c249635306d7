"""Choosing the next token: repetition penalty (as Hugging Face applies it), temperature, top-p.

Temperature 0 is greedy. One ``torch.Generator`` per row, seeded from the request, makes a
sampled answer replayable exactly (the steered and default runs share the seed).

Two samplers draw from the same distribution with different random streams:
- ``cdf`` (the default): the penalty, temperature and top-p of all rows in one tensor
  expression, then one uniform number per row from its generator, inverted through the
  row's cumulative distribution. ``torch.multinomial`` draws one exponential per vocabulary
  entry (49,152 for SmolLM2), which cost 15 % of an experiment batch's time at 48 rows.
- ``multinomial``: the sampler of every record written before the ``sampler`` field existed
  (one row at a time, ``torch.multinomial``); kept so those records and runs replay exactly.
"""

from __future__ import annotations

import torch

from esr_core.steering.spec import LEGACY_SAMPLER, GenerationSpec


def sample_next(logits: torch.Tensor, history: list[int], spec: GenerationSpec, gen: torch.Generator) -> int:
    """The legacy sampler for one row: repetition penalty (as HF applies it), temperature, top-p,
    ``torch.multinomial``; temperature 0 is greedy."""
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


def choose_tokens(logits: torch.Tensor, specs: list[GenerationSpec], gens: list[torch.Generator],
                  histories: list[list[int]]) -> list[int]:
    """The next token of every row of ``logits`` [rows, vocab] under its own spec, generator and
    history (prompt and answer so far, for the penalty). Greedy rows give the same token under
    either sampler."""
    n = logits.shape[0]
    out = [0] * n
    legacy = {k for k, s in enumerate(specs) if s.sampler == LEGACY_SAMPLER}
    for k in legacy:
        out[k] = sample_next(logits[k], histories[k], specs[k], gens[k])
    rows = [k for k in range(n) if k not in legacy]
    if not rows:
        return out
    x = logits.float().cpu()
    x = x[torch.tensor(rows, dtype=torch.long)] if len(rows) < n else x.clone()
    _penalise(x, [histories[k] for k in rows], [float(specs[k].repetition_penalty) for k in rows])
    temp = [float(specs[k].temperature) for k in rows]
    hot = [j for j, t in enumerate(temp) if t > 0]
    picks = x.argmax(dim=-1) if len(hot) < len(rows) else torch.zeros(len(rows), dtype=torch.long)
    if hot:
        h = torch.tensor(hot, dtype=torch.long)
        xh = x[h] if len(hot) < len(rows) else x
        t = torch.tensor([temp[j] for j in hot]).view(-1, 1)
        top_p = torch.tensor([float(specs[rows[j]].top_p) for j in hot]).view(-1, 1)
        # unnormalised probabilities, in place: exp((x - max) / T); the cdf's last entry is their sum
        w = xh.sub_(xh.max(dim=-1, keepdim=True).values).div_(t).exp_()
        order = None
        if bool((top_p < 1.0).any()):
            w, order = torch.sort(w / w.sum(dim=-1, keepdim=True), dim=-1, descending=True)
            cum = w.cumsum(dim=-1)
            w = w.masked_fill_((cum - w) > top_p, 0.0)
        cdf = w.cumsum_(dim=-1)
        u = torch.cat([torch.rand(1, generator=gens[rows[j]]) for j in hot]).view(-1, 1)
        pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[1] - 1)
        if order is not None:
            pick = order.gather(1, pick)
        picks[h] = pick.flatten()
    for j, k in enumerate(rows):
        out[k] = int(picks[j])
    return out


def _penalise(x: torch.Tensor, histories: list[list[int]], penalties: list[float]) -> None:
    """HF's repetition penalty in place on the seen tokens of each row (a logit below 0 is
    multiplied by the penalty, one above divided), touching only those entries."""
    r, c, p = [], [], []
    for j, (hist, pen) in enumerate(zip(histories, penalties)):
        if pen != 1.0 and hist:
            u = set(hist)
            r += [j] * len(u)
            c += u
            p += [pen] * len(u)
    if not r:
        return
    r, c, p = torch.tensor(r), torch.tensor(c).clamp_(0, x.shape[1] - 1), torch.tensor(p)
    v = x[r, c]
    x[r, c] = torch.where(v < 0, v * p, v / p)
