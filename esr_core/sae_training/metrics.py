"""Quality of an SAE on held-out text: explained variance, L0, dead latents, CE-loss recovered.

Definitions (positions >= 1 only: position 0 is the attention sink and is never touched):
- explained variance = 1 - sum ||h - h_hat||^2 / sum ||h - mean(h)||^2 over all tokens;
- L0 = mean number of active latents per token;
- dead fraction = share of latents never active on the evaluated tokens (more tokens
  give a lower, fairer number; ``tokens_evaluated`` says how many were used);
- CE-loss recovered = (L_zero - L_sae) / (L_zero - L_clean), where L is the next-token
  loss of the full model with the residual at the hook left alone (clean), replaced by the
  SAE reconstruction (sae) or replaced by zeros (zero), at positions >= 1.

The held-out text comes from :func:`esr_core.sae_training.corpus.heldout_texts`: the corpus' held-out
split when it is built, else the public-domain sample shipped in assets, so the metrics
can be measured offline without fetching anything.
"""

from __future__ import annotations

import time

from esr_core.errors import BadInput, SaeUnavailable
from esr_core.jobs import Progress, check_cancel, report
from esr_core.models.hooks import check_layer, on_output, recording
from esr_core.models.loading import load_model
from esr_core.models.registry import DEFAULT_MODEL
from esr_core.models.sae import SaeHandle, load_sae
from esr_core.sae_training.corpus import heldout_documents, heldout_texts, token_windows


def _model_name_for(handle) -> str:
    name = handle.meta.get("model")
    if not name:
        md = getattr(handle.sae.cfg, "metadata", None)
        name = getattr(md, "model_name", None)
    return name or DEFAULT_MODEL


def measure_sae(sae, model_name: str | None = None, n_tokens: int = 30_000, batch_size: int = 16,
                window: int = 128, heldout: str = "auto", progress: Progress | None = None, cancel=None,
                model=None) -> dict:
    """Measure ``sae`` (an SAE folder/spec or a loaded ``SaeHandle``) on ~``n_tokens`` held-out tokens.

    ``model`` (a loaded model) measures it on another model than the one it was trained on,
    e.g. the base model's SAE on a fine-tuned copy.
    """
    import torch  # heavy: torch, only when a model runs

    if n_tokens < window:
        raise BadInput(f"--tokens must be at least {window}")
    handle = sae if isinstance(sae, SaeHandle) else load_sae(sae)
    if handle.layer is None or not handle.hook_name.endswith("hook_resid_post"):
        raise SaeUnavailable(f"sae-metrics supports residual-stream SAEs (blocks.L.hook_resid_post), not {handle.hook_name}")
    lm = model if model is not None else load_model(model_name or _model_name_for(handle))
    model_name = lm.name
    check_layer(lm.hf_model, handle.layer)
    if handle.d_in != lm.d_model:
        raise SaeUnavailable(f"SAE width {handle.d_in} does not match {model_name}'s d_model {lm.d_model}")
    _, heldout_source = heldout_documents(model_name, heldout)
    texts = heldout_texts(n_tokens + n_tokens // 4, tokenizer=lm.tokenizer, model_name=model_name, source=heldout)
    windows = token_windows(texts, lm.tokenizer, window=window, max_tokens=n_tokens)
    sae_mod = handle.sae
    hook_name = handle.hook_name
    splice = {"op": None}

    def replace(h):
        """Replace positions >= 1 by the SAE reconstruction or by zeros (position 0 untouched)."""
        if splice["op"] is None:
            return None
        new = h.clone()
        new[:, 1:, :] = 0 if splice["op"] == "zero" else splice["h_hat"].to(h.dtype)
        return new

    handle_hook = on_output(lm, hook_name, replace)
    n_lat = handle.d_sae
    fired = torch.zeros(n_lat, dtype=torch.bool)
    sums = {"err": 0.0, "sq": 0.0, "l0": 0.0, "n": 0, "clean": 0.0, "sae": 0.0, "zero": 0.0, "n_pred": 0}
    h_sum = torch.zeros(lm.d_model, dtype=torch.float64)
    norms = []
    t0 = time.time()
    try:
        with torch.no_grad():
            for b in range(0, len(windows), batch_size):
                check_cancel(cancel, "sae-metrics")
                ids = torch.as_tensor(windows[b : b + batch_size])
                targets = ids[:, 2:]

                def loss_of(logits):
                    lp = torch.log_softmax(logits[:, 1:-1].float(), dim=-1)
                    return -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum().item()

                splice["op"] = None
                with recording(lm, [hook_name]) as got:
                    clean = loss_of(lm.hf_model(input_ids=ids, use_cache=False).logits)
                h = got[hook_name][:, 1:, :].float()
                z = sae_mod.encode(h)
                h_hat = sae_mod.decode(z)
                splice.update(op="sae", h_hat=h_hat)
                spliced = loss_of(lm.hf_model(input_ids=ids, use_cache=False).logits)
                splice["op"] = "zero"
                zero = loss_of(lm.hf_model(input_ids=ids, use_cache=False).logits)
                flat, flat_hat, zf = h.reshape(-1, h.shape[-1]), h_hat.reshape(-1, h.shape[-1]), z.reshape(-1, n_lat)
                sums["err"] += (flat - flat_hat).pow(2).sum().item()
                sums["sq"] += flat.double().pow(2).sum().item()
                h_sum += flat.double().sum(0)
                sums["l0"] += (zf > 0).sum().item()
                sums["n"] += flat.shape[0]
                fired |= (zf > 0).any(0)
                norms.append(flat.norm(dim=-1))
                sums["clean"] += clean
                sums["sae"] += spliced
                sums["zero"] += zero
                sums["n_pred"] += targets.numel()
                report(progress, "sae-metrics", min(b + batch_size, len(windows)), len(windows),
                       f"{time.time() - t0:.0f}s")
    finally:
        handle_hook.remove()
    n = sums["n"]
    total_var = sums["sq"] - (h_sum.pow(2).sum().item() / n)
    l_clean, l_sae, l_zero = (sums[k] / sums["n_pred"] for k in ("clean", "sae", "zero"))
    ce_rec = (l_zero - l_sae) / (l_zero - l_clean) if l_zero != l_clean else float("nan")
    return {
        "explained_variance": round(1 - sums["err"] / total_var, 4),
        "l0": round(sums["l0"] / n, 2),
        "dead_fraction": round(1 - fired.float().mean().item(), 4),
        "ce_loss_recovered": round(ce_rec, 4),
        "tokens_evaluated": int(n),
        "clean_loss": round(l_clean, 4),
        "sae_loss": round(l_sae, 4),
        "zero_ablation_loss": round(l_zero, 4),
        "median_resid_norm": round(float(torch.cat(norms).median()), 2),
        "heldout_source": heldout_source,
        "seconds": round(time.time() - t0, 1),
    }


