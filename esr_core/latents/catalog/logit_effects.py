"""What each latent does to the next-token prediction: promoted and suppressed tokens.

Why not the decoder row times the unembedding (the usual "logit lens" of feature pages): for an
SAE in the middle of the network the remaining layers transform the direction, and the direct
product is dominated by tokens with large unembedding rows ("between", " strugg", ...) shared
by thousands of latents. Here the direction is added, at the latent's own peak activation, to
the residual at the SAE's hook on the last token of a few neutral contexts, and the rest of the
network runs; the change in next-token log-probabilities is averaged over the contexts. The
common component, the change any latent of that size makes (the mean over all latents, per
token), is removed, so what remains is what this latent specifically pushes up or down.
Values are in nats (log-probability change).
"""

from __future__ import annotations

import copy

import numpy as np

from esr_core.jobs import Progress, check_cancel, report_fraction
from esr_core.models.hooks import on_output
from esr_core.models.loading import kv_cache_arg

# our own neutral openings: the next token could be many things
CONTEXTS = ("The weather today is", "She walked into the room and", "Here is a simple recipe:",
            "In the news this morning,", "My favourite thing to do is", "The answer to your question is",
            "Once upon a time there", "To fix the problem, first")
METHOD = ("causal: the latent's direction added at its peak activation at the hook on the last token of "
          f"{len(CONTEXTS)} neutral contexts, mean change in next-token log-probability, minus the mean over "
          "all latents (the common component)")


def causal_logit_effects(model, sae, scales: np.ndarray, k: int = 10, batch_size: int = 256,
                         contexts=CONTEXTS, progress: Progress | None = None, cancel=None):
    """(promoted ids, values, suppressed ids, values), each [d_sae, k], values in nats.

    ``scales`` [d_sae] is the activation each latent is added at (its catalog maximum; a dead
    latent's 0 gives no effect and ranks tokens by the common component's negative).
    """
    import torch  # heavy: torch, only when a model runs
    from transformers import DynamicCache  # heavy: transformers

    hf, tok = model.hf_model, model.tokenizer
    dev = next(hf.parameters()).device
    W = sae.W_dec.detach().float().to(dev)
    d_sae = W.shape[0]
    scales_t = torch.as_tensor(np.asarray(scales, dtype=np.float32), device=dev)
    push: dict = {"delta": None}

    def add_at_last(h):
        if push["delta"] is None:
            return None
        h = h.clone()
        h[:, -1, :] += push["delta"].to(h.dtype)
        return h

    total = torch.zeros(d_sae, int(hf.config.vocab_size), dtype=torch.float32)
    kv = kv_cache_arg(hf)
    handle = on_output(model, sae.hook_name, add_at_last)
    n_steps = len(contexts) * ((d_sae + batch_size - 1) // batch_size)
    step = 0
    try:
        with torch.no_grad():
            for c in contexts:
                ids = tok(c, return_tensors="pt").input_ids.to(dev)
                prefix, last = ids[:, :-1], ids[:, -1:]
                cache = DynamicCache()
                hf(input_ids=prefix, use_cache=True, **{kv: cache})
                clean = hf(input_ids=last, use_cache=True, **{kv: _copy(cache, 1)}).logits[0, -1]
                clean = clean.float().log_softmax(-1).cpu()
                for a in range(0, d_sae, batch_size):
                    check_cancel(cancel, "Logit effects")
                    b = min(a + batch_size, d_sae)
                    push["delta"] = W[a:b] * scales_t[a:b, None]
                    out = hf(input_ids=last.expand(b - a, -1), use_cache=True, **{kv: _copy(cache, b - a)})
                    push["delta"] = None
                    total[a:b] += out.logits[:, -1].float().log_softmax(-1).cpu() - clean[None]
                    step += 1
                    report_fraction(progress, "logit effects", step / n_steps, f"{b}/{d_sae} latents")
    finally:
        handle.remove()
    total /= len(contexts)
    total -= total.mean(0, keepdim=True)  # the common component: what any push of this size does
    pv, pi = total.topk(k, dim=1)
    sv, si = (-total).topk(k, dim=1)
    return (pi.numpy().astype(np.int32), pv.numpy().astype(np.float16),
            si.numpy().astype(np.int32), (-sv).numpy().astype(np.float16))


def _copy(cache, batch: int):
    """The prefix's key/value cache for ``batch`` rows (a fresh copy: a forward extends it)."""
    c = copy.deepcopy(cache)
    if batch > 1:
        c.batch_repeat_interleave(batch)
    return c
