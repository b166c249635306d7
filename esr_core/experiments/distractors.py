"""Choosing distractor latents: live, labelled, concrete, and silent on the task prompts.

ESR_METHOD.md sec. 3 (arXiv 2602.06941). The paper asks an LLM to rate each label's
concreteness 0-100 and keeps >= 65; offline we rate it ourselves (:func:`concreteness`):
    score = 100 * (0.60 * E + 0.25 * K + 0.15 * T)

- E: embedding evidence. Cosine similarity (all-MiniLM-L6-v2) of the label to five
  "concrete" anchors (physical objects, places, food, animals, physical activities) minus
  its similarity to five "abstract" anchors (style, grammar, punctuation, assistant
  behaviour, formatting); E = sigmoid((best_concrete - best_abstract) / 0.05).
- K: the catalog's own topic kind for the label (concrete 1, abstract or unknown 0.5,
  format/language/dead 0).
- T: token evidence: the share of the latent's top activating tokens that are content words
  (alphabetic, >= 3 letters, not a stop word).

Labels the catalog marks as low confidence count as no label (the paper drops unlabelled
latents), unless ``allow_low_confidence``.

The relevance rule comes in both readings, recorded in every result:
``code``: the latent's activation is exactly 0 on every token of every prompt (position 0,
the attention sink, excluded); ``paper``: the latent is not among any prompt's top-100
latents (by max activation over the prompt's tokens). Prompts are run as the model sees them
(chat template rendered, generation prompt added).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import numpy as np

from esr_core.errors import BadInput, Cancelled
from esr_core.models.embeddings import embed

CONCRETE_ANCHORS = [
    "a concrete physical object you can touch",
    "a place, a city or a country",
    "food, cooking and things to eat",
    "an animal",
    "a sport or physical activity",
]
ABSTRACT_ANCHORS = [
    "writing style and tone",
    "grammar, syntax and function words",
    "punctuation marks and symbols",
    "the assistant's behaviour, politeness and helpfulness",
    "formatting, numbers, lists and code",
]
KIND_SCORE = {"concrete": 1.0, "abstract": 0.5, "": 0.5, "format": 0.0, "language": 0.0, "dead": 0.0}
W_EMBED, W_KIND, W_TOKENS = 0.60, 0.25, 0.15
TEMPERATURE = 0.05
TOP_K_PAPER = 100
STOP_WORDS = set("""the and for that with this from have are was were will would could should can not you your
they them their there here what when where which who why how about into onto than then also just only very
more most some such each other any all been being does did doing had has its it's our out over under upon
""".split())
_LOW = "(low confidence)"


def _content_word(tok: str) -> bool:
    w = tok.strip().lower()
    return len(w) >= 3 and bool(re.fullmatch(r"[a-z]+", w)) and w not in STOP_WORDS


def clean_label(text: str) -> str:
    return (text or "").replace(_LOW, "").strip()


def concreteness(labels: Sequence[str], kinds: Sequence[str] | None = None,
                 top_tokens: Sequence[Sequence[str]] | None = None,
                 embed_fn: Callable[[list[str]], np.ndarray] | None = None) -> list[dict[str, float]]:
    """Concreteness 0-100 per label with its parts (see the module docstring)."""
    embed_fn = embed_fn or embed
    labels = [clean_label(x) for x in labels]
    n = len(labels)
    if n == 0:
        return []
    anchors = CONCRETE_ANCHORS + ABSTRACT_ANCHORS
    vecs = embed_fn(anchors + [x or "nothing" for x in labels])
    a, v = vecs[:len(anchors)], vecs[len(anchors):]
    sims = v @ a.T
    c_best = sims[:, :len(CONCRETE_ANCHORS)].max(axis=1)
    a_best = sims[:, len(CONCRETE_ANCHORS):].max(axis=1)
    out = []
    for i in range(n):
        e = 1.0 / (1.0 + math.exp(-float(c_best[i] - a_best[i]) / TEMPERATURE))
        k = KIND_SCORE.get((kinds[i] if kinds is not None else "") or "", 0.5)
        toks = list(top_tokens[i]) if top_tokens is not None else []
        t = (sum(_content_word(x) for x in toks) / len(toks)) if toks else 0.0
        score = 100.0 * (W_EMBED * e + W_KIND * k + W_TOKENS * t) if labels[i] else 0.0
        out.append({"score": round(score, 1), "embed": round(e, 3), "kind": k, "tokens": round(t, 3),
                    "sim_concrete": round(float(c_best[i]), 3), "sim_abstract": round(float(a_best[i]), 3)})
    return out


def prompt_activation_stats(engine, prompts: Sequence[str], top_k: int = TOP_K_PAPER,
                            cancel=None) -> tuple[np.ndarray, np.ndarray]:
    """(max activation per latent over all prompts [d_sae], union of per-prompt top-k ids mask)."""
    d = engine.sae.d_sae
    mx = np.zeros(d, dtype=np.float32)
    in_top = np.zeros(d, dtype=bool)
    for p in prompts:
        if cancel is not None and cancel.is_set():
            raise Cancelled("Distractor selection cancelled")
        res = engine.activations(messages=[{"role": "user", "content": p}], add_generation_prompt=True)
        z = res.z[1:].float().numpy() if hasattr(res.z, "numpy") else np.asarray(res.z)[1:]
        if z.shape[0] == 0:
            continue
        per = z.max(axis=0)
        mx = np.maximum(mx, per)
        k = min(top_k, d)
        top = np.argpartition(-per, k - 1)[:k]
        top = top[per[top] > 0]  # a silent latent is never "top"
        in_top[top] = True
    return mx, in_top


def _kind(catalog, i: int) -> str:
    """The catalog's topic kind of a label (cheap: no feature page is built)."""
    col = getattr(catalog, "_lat", {}).get("topic_kind") if hasattr(catalog, "_lat") else None
    if col is not None and i < len(col):
        return str(col[i] or "")
    if hasattr(catalog, "entry"):
        return str(catalog.entry(i).get("topic_kind", ""))
    return ""


def _low_confidence(catalog, i: int, text: str) -> bool:
    col = getattr(catalog, "_lat", {}).get("low_confidence") if hasattr(catalog, "_lat") else None
    if col is not None and i < len(col):
        return bool(col[i])
    return _LOW in (text or "")


def select_distractors(catalog, engine, prompts: Sequence[str], n: int, rule: str = "code",
                       min_concreteness: float = 65.0, seed: int = 0,
                       exclude: Sequence[int] = (), require_label: bool = True,
                       allow_low_confidence: bool = False,
                       embed_fn=None, cancel=None) -> dict[str, Any]:
    """Pick ``n`` distractor latents; returns ``{"latents", "labels", "scores", "report"}``.

    Candidates are visited in a seeded random order; the report counts how many were
    dropped by each rule so the choice can be audited.
    """
    if rule not in ("code", "paper"):
        raise BadInput(f"relevance rule must be 'code' or 'paper', got {rule!r}")
    if n < 1:
        raise BadInput("Need at least one distractor latent")
    d = int(catalog.d_sae)
    dead = np.asarray(catalog.dead, dtype=bool)
    raw = [catalog.description(i) for i in range(d)]
    descs = [clean_label(x) for x in raw]
    mx, in_top = prompt_activation_stats(engine, prompts, cancel=cancel)
    relevant = (mx > 0) if rule == "code" else in_top
    excl = set(int(x) for x in exclude)
    counts = {"total": d, "dead": int(dead.sum()), "unlabelled": 0, "low_confidence_label": 0, "excluded": 0,
              "relevant_to_prompts": 0, "not_concrete": 0, "rated": 0}
    pool = []
    for i in range(d):
        if dead[i]:
            continue
        if require_label and not descs[i]:
            counts["unlabelled"] += 1
            continue
        if require_label and not allow_low_confidence and _low_confidence(catalog, i, raw[i]):
            counts["low_confidence_label"] += 1  # a label the catalog itself doubts is no label
            continue
        if i in excl:
            counts["excluded"] += 1
            continue
        if relevant[i]:
            counts["relevant_to_prompts"] += 1
            continue
        pool.append(i)
    rng = np.random.default_rng(seed)
    order = [pool[j] for j in rng.permutation(len(pool))]
    chosen, scores = [], {}
    # rate in chunks (embedding the whole pool at once is wasteful when n is small)
    step = max(4 * n, 64)
    for s in range(0, len(order), step):
        chunk = order[s:s + step]
        kinds = [_kind(catalog, i) for i in chunk]
        toks = [catalog.top_tokens(i) if hasattr(catalog, "top_tokens") else [] for i in chunk]
        rated = concreteness([descs[i] for i in chunk], kinds, toks, embed_fn=embed_fn)
        counts["rated"] += len(chunk)
        for i, r in zip(chunk, rated):
            scores[i] = r
            if r["score"] >= min_concreteness:
                chosen.append(i)
            else:
                counts["not_concrete"] += 1
            if len(chosen) >= n:
                break
        if len(chosen) >= n:
            break
    if not chosen:
        raise BadInput(f"No latent passed the selection ({rule} relevance, concreteness >= {min_concreteness:g}); "
                       f"counts: {counts}")
    report = {"rule": rule, "min_concreteness": min_concreteness, "seed": seed, "requested": n,
              "allow_low_confidence": allow_low_confidence,
              "chosen": len(chosen), "pool_after_relevance": len(pool), "counts": counts,
              "n_prompts": len(prompts),
              "method": "concreteness = 100*(0.60*embedding + 0.25*catalog kind + 0.15*content-word tokens)"}
    return {"latents": chosen, "labels": {i: descs[i] for i in chosen},
            "scores": {i: scores[i] for i in chosen}, "report": report,
            "prompt_max_act": mx, "relevant": relevant}
