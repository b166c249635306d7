"""A latent's page and the two ways to find latents: by description and by what fires on a text.

Falls back to what the weights alone tell (promoted tokens, neighbours) when the SAE has no
catalog yet, so latent ids always work.
"""

from __future__ import annotations

from typing import Any

from esr_core.errors import BadInput, EsrError
from esr_core.latents.search import latents_firing_on, search_latents

NO_DESCRIPTION = "no description"


def description(catalog, latent: int) -> str:
    if catalog is None:
        return NO_DESCRIPTION
    try:
        return catalog.description(int(latent)) or NO_DESCRIPTION
    except (EsrError, IndexError, ValueError, TypeError):
        return NO_DESCRIPTION


def search(catalog, query: str, top: int = 20, d_sae: int | None = None) -> list[dict]:
    """Semantic + lexical search over descriptions; a bare number (or #123) finds that latent."""
    q = (query or "").strip()
    if not q:
        return []
    ids = []
    for tok in q.replace(",", " ").split():
        t = tok.lstrip("#")
        if t.isdigit():
            ids.append(int(t))
    if ids and len(ids) == len(q.replace(",", " ").split()):
        out = []
        for i in ids:
            if d_sae is not None and not 0 <= i < d_sae:
                raise BadInput(f"Latent {i} is out of range: this SAE has latents 0..{d_sae - 1}")
            out.append(_row(catalog, i, score=1.0))
        return out
    if catalog is None:
        raise BadInput("No latent catalog for this SAE yet, so descriptions cannot be searched; "
                       "type latent ids, use 'which latents fire on my text', or build the catalog")
    return [dict(r) for r in search_latents(catalog, q, top=top)]


def _row(catalog, i: int, score: float) -> dict:
    d = {"latent": int(i), "description": description(catalog, i), "score": float(score), "density": None,
         "max_act": None}
    if catalog is not None:
        try:
            d["density"] = float(catalog.density[i])
            d["max_act"] = float(catalog.max_act[i])
        except (IndexError, AttributeError):
            pass
    return d


def firing_on(engine, text: str, top: int = 20, catalog=None) -> list[dict]:
    """Latents that fire most on ``text`` (max over tokens, position 0 excluded)."""
    if catalog is not None:  # ranks by activation relative to each latent's catalog maximum
        out = []
        for r in latents_firing_on(engine, text, top=top, catalog=catalog):
            row = _row(catalog, int(r["latent"]), float(r.get("relative", 0.0)))
            row["act"] = float(r.get("max_act_on_text", 0.0))
            row["token"] = r.get("token")
            out.append(row)
        return out
    res = engine.activations(text=text)
    z = res.z[1:] if res.z.shape[0] > 1 else res.z
    mx, arg = z.max(dim=0)
    vals, idx = mx.topk(min(top, z.shape[1]))
    out = []
    for v, i in zip(vals.tolist(), idx.tolist()):
        if v <= 0:
            break
        r = _row(catalog, i, v)
        r["act"] = float(v)
        r["token"] = res.tokens[int(arg[i]) + (1 if res.z.shape[0] > 1 else 0)]
        out.append(r)
    return out


def latent_entry(engine, catalog, latent: int) -> dict:
    """A feature page: the catalog entry when there is one, else what the weights alone tell."""
    i = engine.sae.check_latent(latent)
    if catalog is not None:
        try:
            e = dict(catalog.entry(i))
            e.setdefault("description", NO_DESCRIPTION)
            e["from_catalog"] = True
            return e
        except EsrError:
            pass
    e = {"latent": i, "description": NO_DESCRIPTION, "density": None, "max_act": None, "histogram": None,
         "contexts": {"text": [], "chat": []}, "from_catalog": False, "dead": False}
    e.update(weight_facts(engine, i))
    return e


WEIGHTS_ONLY_METHOD = ("weights only (no catalog yet): the decoder direction minus the mean direction, through the "
                       "final norm and unembedding; "
                       "for an SAE in the middle of the network this is a poor guide; build the catalog for the causal "
                       "effects")


def logit_method(catalog, entry: dict) -> str:
    """How the promoted and suppressed tokens on this page were computed, in one line."""
    if not entry.get("from_catalog"):
        return WEIGHTS_ONLY_METHOD
    m = (catalog.meta.get("logit_effects") if catalog is not None else None) or ""
    if not m:
        return "decoder direction through the unembedding (catalog built before the causal method; refresh it with " \
               "`esr-lab catalog refresh --what logit-effects`)"
    return "Method, " + m


def logit_unit(entry: dict) -> str:
    return "nats (log-probability change)" if entry.get("from_catalog") else "logit (direct product)"


def weight_facts(engine, latent: int, n: int = 10) -> dict:
    """Promoted/suppressed tokens (decoder direction through the final norm and unembedding) and
    nearest latents: what the weights alone tell, before a catalog exists."""
    import torch  # heavy: torch, only with a loaded model

    W = engine.W_dec
    d = W[latent]
    out: dict[str, Any] = {}
    try:
        hf = engine.model.hf_model
        U = hf.get_output_embeddings().weight.detach().float()
        norm = getattr(getattr(hf, "model", hf), "norm", None)
        g = getattr(norm, "weight", None)
        d = d - W.mean(0)  # the common component: what every latent's direction shares
        if g is not None and g.shape == d.shape:
            g = g.detach().float()
            d = d * ((1.0 + g) if "Gemma" in type(norm).__name__ else g)  # Gemma's RMSNorm scales by 1 + w
        logits = U @ d
        tok = engine.model.tokenizer
        pv, pi = torch.topk(logits, n)
        sv, si = torch.topk(-logits, n)
        out["promoted"] = [{"token": tok.decode([int(t)]), "token_id": int(t), "logit": float(v)}
                           for t, v in zip(pi, pv)]
        out["suppressed"] = [{"token": tok.decode([int(t)]), "token_id": int(t), "logit": -float(v)}
                             for t, v in zip(si, sv)]
    except Exception:
        out["promoted"], out["suppressed"] = [], []
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = Wn @ Wn[latent]
    cos[latent] = -2
    cv, ci = torch.topk(cos, min(8, W.shape[0] - 1))
    out["neighbours"] = [{"latent": int(j), "cosine": round(float(c), 4), "description": NO_DESCRIPTION}
                         for j, c in zip(ci, cv)]
    return out


def text_activation(engine, text: str, latent: int) -> dict:
    """One latent on the user's own text: per-token values and the maximum (position 0 excluded)."""
    res = engine.activations(text=text)
    vals = res.z[:, int(latent)].tolist()
    body = vals[1:] if len(vals) > 1 else vals
    return {"tokens": res.tokens, "values": vals, "max": float(max(body)) if body else 0.0}
