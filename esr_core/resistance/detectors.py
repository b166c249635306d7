"""Off-topic detector latents (the "resistance circuit") found by a contrastive search.

ESR_METHOD.md sec. 5 (arXiv 2602.06941): a latent that separates "prompt + its own answer"
from "prompt + someone else's answer" is a candidate for the model's sense that it has gone
off-topic. We render each pair as a [user, assistant] chat, read the SAE code at the hook for
every token (unsteered), max-pool over positions (position 0, the attention sink, never
counts), and score each latent by the rank AUC of off-topic vs on-topic pooled activations.
Off-topic pairs come from seeded derangements of the answers; held-out derangements (or held-
out prompts) check that the chosen latents are not an accident of one pairing.

Groups are plain JSON (:func:`save_group`, :func:`load_group`) shared with the backtracking
search (:mod:`.backtracking`) and the per-token view (:mod:`.resistance_view`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from esr_core.io import atomic_write_json
from esr_core.errors import BadInput, Cancelled, EsrError
from esr_core.paths import ASSETS_DIR, REPO_ROOT

log = logging.getLogger(__name__)

GROUPS_DIR = ASSETS_DIR / "groups"
CIRCUIT_PATH = GROUPS_DIR / "resistance_circuit.json"
BACKTRACKING_PATH = GROUPS_DIR / "backtracking.json"
GROUP_FORMAT = "esr-latent-group-v1"
CIRCUIT_COLOUR = "#D55E00"  # Okabe-Ito vermillion (colour-blind safe)
BACKTRACKING_COLOUR = "#0072B2"  # Okabe-Ito blue

RULES = ("auc", "strict")


class GroupUnavailable(EsrError):
    """A latent group file is missing, corrupt, or belongs to another SAE."""


@dataclass
class DetectorParams:
    """Everything that decides the search result; stored in the group so it can be reproduced."""

    rule: str = "auc"
    threshold: float = 1.0  # AUC threshold for rule 'auc'
    relax_to: float = 0.8  # rule 'auc': lower the threshold in 0.05 steps down to this if nothing passes
    min_size: int = 3  # ... until at least this many latents pass
    strict_min_off_freq: float = 0.8  # rule 'strict': fires on >= this share of off-topic pairs
    max_size: int = 26  # the paper's final set had 26 latents
    derangements: int = 2
    derangement_seeds: tuple[int, ...] = ()  # empty: 0..derangements-1
    heldout: str = "derangements"  # "derangements" (new seeds, same prompts) | "prompts" (split prompts)
    heldout_seeds: tuple[int, ...] = (1001,)
    heldout_prompt_frac: float = 0.3
    response_only: bool = True  # max-pool over the assistant turn only (else prompt + response)
    avoid_same_topic: bool = True  # off-topic answers come from prompts of another topic when possible
    max_answer_chars: int = 600  # the first ~130 tokens of each answer: drift shows early
    n_prompts: int | None = None  # None: all
    answers_path: str | None = None  # None: assets/prompts/default_answers.jsonl
    batch_size: int = 8
    threshold_rule: str = "youden"  # alert threshold: "youden" (best on/off split of peak activity) | "quantile"
    threshold_quantile: float = 0.95  # rule "quantile" (and the floor of "youden"): on-topic token quantile
    threshold_how: str = "sum"
    threshold_ema: float = 0.5

    def search_seeds(self) -> list[int]:
        return list(self.derangement_seeds) or list(range(int(self.derangements)))

    def validate(self) -> "DetectorParams":
        if self.rule not in RULES:
            raise BadInput(f"Unknown selection rule '{self.rule}' (use auc or strict)")
        if not 0.5 <= float(self.threshold) <= 1.0:
            raise BadInput(f"AUC threshold must be in [0.5, 1], got {self.threshold}")
        if not 0.0 < float(self.strict_min_off_freq) <= 1.0:
            raise BadInput(f"strict off-topic frequency must be in (0, 1], got {self.strict_min_off_freq}")
        if not 1 <= int(self.max_size) <= 1000:
            raise BadInput(f"max group size must be in 1..1000, got {self.max_size}")
        if not 1 <= int(self.derangements) <= 50:
            raise BadInput(f"derangements must be in 1..50, got {self.derangements}")
        if self.threshold_rule not in ("youden", "quantile"):
            raise BadInput(f"threshold rule must be 'youden' or 'quantile', got {self.threshold_rule!r}")
        if self.heldout not in ("derangements", "prompts"):
            raise BadInput(f"heldout must be 'derangements' or 'prompts', got {self.heldout!r}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["derangement_seeds"] = self.search_seeds()
        d["heldout_seeds"] = list(self.heldout_seeds)
        return d


# ----------------------------------------------------------------------------- pure helpers


def derangement(n: int, seed: int, groups: Sequence | None = None, tries: int = 200) -> np.ndarray:
    """A seeded permutation with no fixed point (``perm[i] != i``).

    With ``groups`` (e.g. prompt topics) it also tries to avoid ``groups[perm[i]] == groups[i]``
    so an "off-topic" answer is not merely a neighbouring how-to; falls back to a plain
    derangement when that is impossible.
    """
    if n < 2:
        raise BadInput("A derangement needs at least two prompts")
    rng = np.random.default_rng(int(seed))
    idx = np.arange(n)
    best = None
    for _ in range(tries):
        p = rng.permutation(n)
        if np.any(p == idx):
            continue
        if groups is None:
            return p
        same = sum(groups[i] == groups[p[i]] for i in range(n))
        if same == 0:
            return p
        if best is None or same < best[0]:
            best = (same, p)
    if best is not None:
        return best[1]
    # Sattolo's algorithm: a uniformly random n-cycle, always a derangement
    p = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))
        p[i], p[j] = p[j], p[i]
    return np.asarray(p)


def rank_auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Per-column AUC = P(pos > neg) + 0.5 P(pos == neg), by average ranks (Mann-Whitney U).

    ``pos`` [n_pos, d], ``neg`` [n_neg, d]; ties get half credit, so a latent that is zero
    everywhere scores exactly 0.5.
    """
    from scipy.stats import rankdata

    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    if pos.ndim == 1:
        pos = pos[:, None]
    if neg.ndim == 1:
        neg = neg[:, None]
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    if n_pos == 0 or n_neg == 0:
        raise BadInput("AUC needs at least one example in each class")
    ranks = rankdata(np.concatenate([pos, neg], axis=0), axis=0)
    u = ranks[:n_pos].sum(axis=0) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def class_stats(on: np.ndarray, off: np.ndarray) -> dict[str, np.ndarray]:
    """Means and active frequencies (share of pairs with activation > 0) per latent."""
    return {"on_mean": on.mean(axis=0), "off_mean": off.mean(axis=0),
            "on_freq": (on > 0).mean(axis=0), "off_freq": (off > 0).mean(axis=0)}


def select_latents(auc: np.ndarray, st: dict[str, np.ndarray], params: DetectorParams) -> tuple[list[int], float]:
    """Apply the selection rule; returns (latents ranked best first, AUC threshold actually used)."""
    order_key = lambda i: (-auc[i], -(st["off_freq"][i] - st["on_freq"][i]), -(st["off_mean"][i] - st["on_mean"][i]))
    if params.rule == "strict":
        ok = np.where((st["on_freq"] == 0) & (st["off_freq"] >= params.strict_min_off_freq))[0]
        return sorted(map(int, ok), key=order_key)[: params.max_size], float("nan")
    thr = float(params.threshold)
    while True:
        ok = np.where((auc >= thr - 1e-12) & (st["off_freq"] > 0) & (st["off_mean"] > st["on_mean"]))[0]
        if len(ok) >= params.min_size or thr - 0.05 < params.relax_to - 1e-9:
            return sorted(map(int, ok), key=order_key)[: params.max_size], thr
        thr = round(thr - 0.05, 4)


def youden_threshold(on_peaks: Sequence[float], off_peaks: Sequence[float], floor: float = 0.0) -> dict:
    """Alert threshold that best separates off-topic from on-topic chats by their peak activity.

    A chat "alerts" when its peak (smoothed) circuit activity is strictly above the threshold.
    The threshold maximises Youden's J = TPR - FPR over midpoints between observed peaks, never
    below ``floor``; ties keep the higher threshold (fewer false alarms).
    """
    on = np.asarray(on_peaks, dtype=np.float64)
    off = np.asarray(off_peaks, dtype=np.float64)
    on, off = on[np.isfinite(on)], off[np.isfinite(off)]
    if on.size == 0 or off.size == 0:
        raise BadInput("Youden threshold needs on-topic and off-topic peaks")
    vals = np.unique(np.concatenate([on, off, [floor]]))
    cands = np.unique(np.concatenate([[floor, vals[-1]], (vals[:-1] + vals[1:]) / 2.0]))
    cands = cands[cands >= floor]
    best = None
    for t in cands[::-1]:  # high to low, so a tie keeps the higher threshold
        tpr, fpr = float(np.mean(off > t)), float(np.mean(on > t))
        if best is None or tpr - fpr > best["j"] + 1e-12:
            best = {"value": float(t), "tpr": tpr, "fpr": fpr, "j": tpr - fpr}
    return best


# ----------------------------------------------------------------------------- model side


@dataclass
class PairActs:
    """Max-pooled SAE code of many (prompt, answer) chats, plus on-topic per-token codes if kept."""

    pooled: np.ndarray  # [n_pairs, d_sae]
    per_token: list = field(default_factory=list)  # residuals [T_i, d_model] (torch) when keep_tokens


def render_pair(tokenizer, prompt: str, answer: str, response_only: bool = True) -> tuple[list[int], list[tuple[int, int]], str, int]:
    """Token ids, char offsets, text of a [user, assistant] chat, and the first token to pool."""
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        prefix = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        special = False
    else:
        prefix = prompt + "\n\n"
        text = prefix + answer
        special = True
    if text.startswith(prefix):
        resp_char = len(prefix)
    else:
        k = text.find(answer.strip()[:40]) if answer.strip() else -1
        resp_char = k if k >= 0 else len(prefix)
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = list(enc.input_ids)
    offs = [tuple(map(int, o)) for o in enc["offset_mapping"]]
    first = 1
    if response_only:
        first = next((t for t, (s, e) in enumerate(offs) if s >= resp_char and e > s), len(ids))
        first = max(first, 1)
    return ids, offs, text, first


def residual_batches(engine, seqs: list[list[int]], batch_size: int = 8, cancel=None,
                     progress: Callable[[int, int], None] | None = None):
    """Yield (index, residual [T, d_model]) for each token sequence, unsteered, stopping at the hook."""
    import torch

    from esr_core.latents.catalog import hook_residuals

    tok = engine.model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths per batch: less padding
    done = 0
    for s in range(0, len(order), batch_size):
        if cancel is not None and cancel.is_set():
            raise Cancelled("Detector search cancelled")
        idx = order[s:s + batch_size]
        L = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), L), pad, dtype=torch.long)
        att = torch.zeros((len(idx), L), dtype=torch.long)
        for b, i in enumerate(idx):  # right padding: causal attention keeps real tokens exact
            ids[b, :len(seqs[i])] = torch.tensor(seqs[i])
            att[b, :len(seqs[i])] = 1
        h = hook_residuals(engine.model, engine.hook_name, ids.to(engine.device), att.to(engine.device)).float()
        for b, i in enumerate(idx):
            yield i, h[b, :len(seqs[i])]
        done += len(idx)
        if progress:
            progress(done, len(seqs))


def encode(engine, h):
    """SAE code of residuals ``h`` [T, d_model] as a float32 torch tensor [T, d_sae]."""
    import torch

    with torch.inference_mode():
        return engine.sae.encode(h.to(engine.device)).float().cpu()


def pooled_pairs(engine, pairs: list[tuple[str, str]], response_only: bool = True, batch_size: int = 8,
                 keep_tokens: bool = False, cancel=None, progress=None) -> PairActs:
    """Max-pooled SAE code of each (prompt, answer) chat; optionally keep the pooled residuals."""
    tok = engine.model.tokenizer
    rendered = [render_pair(tok, p, a, response_only) for p, a in pairs]
    pooled = np.zeros((len(pairs), engine.sae.d_sae), dtype=np.float32)
    per_token: list = [None] * len(pairs)
    for i, h in residual_batches(engine, [r[0] for r in rendered], batch_size, cancel, progress):
        first = rendered[i][3]
        if first >= h.shape[0]:
            continue  # nothing to pool (empty answer)
        hh = h[first:]
        z = encode(engine, hh)
        pooled[i] = z.max(dim=0).values.numpy()
        if keep_tokens:
            per_token[i] = hh.cpu()
    return PairActs(pooled=pooled, per_token=per_token if keep_tokens else [])


def ema(x, alpha: float = 0.5) -> np.ndarray:
    """Exponential moving average, s_t = a x_t + (1 - a) s_{t-1}, s_0 = x_0 (alpha 1 or None: raw)."""
    x = np.asarray(x, dtype=np.float64)
    if alpha is None or alpha >= 1.0 or x.size == 0:
        return x.copy()
    if not 0.0 < alpha <= 1.0:
        raise BadInput(f"EMA alpha must be in (0, 1], got {alpha}")
    out = np.empty_like(x)
    s = x[0]
    for t in range(len(x)):
        s = x[t] if t == 0 else alpha * x[t] + (1.0 - alpha) * s
        out[t] = s
    return out


# ----------------------------------------------------------------------------- inputs


def read_answers_file(path: str | Path) -> dict[str, str]:
    """``{id: answer}`` from a JSON list or JSONL of records with ``id`` and ``answer``."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"Answers file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        recs = json.loads(text)
        if isinstance(recs, dict):
            recs = [{"id": k, "answer": v} for k, v in recs.items()]
    except json.JSONDecodeError:
        try:
            recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise BadInput(f"Answers file {p} is neither JSON nor JSONL: {exc}") from None
    out = {}
    for r in recs:
        if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not isinstance(r.get("answer"), str):
            raise BadInput(f"Answers file {p}: every record needs string 'id' and 'answer'")
        out[r["id"]] = r["answer"]
    return out


def load_inputs(n_prompts: int | None = None, max_answer_chars: int = 1200,
                answers_path: str | Path | None = None) -> tuple[list[dict], list[str]]:
    """The shipped prompts and the default model's unsteered answers (or ``answers_path``), aligned."""
    from esr_core.judge.prompts import load_default_answers, load_prompts

    prompts = load_prompts()
    answers = read_answers_file(answers_path) if answers_path else load_default_answers()
    rows = [(p, answers[p["id"]]) for p in prompts if answers.get(p["id"], "").strip()]
    if n_prompts:
        rows = rows[: int(n_prompts)]
    if len(rows) < 3:
        raise BadInput("The detector search needs at least 3 prompts with unsteered answers")
    return [r[0] for r in rows], [r[1][:max_answer_chars] for r in rows]


def sae_identity(engine) -> dict:
    """Which SAE a group belongs to: content hash of the decoder plus where it came from."""
    from esr_core.latents.catalog import sae_weights_hash

    src = str(engine.sae.source)
    try:
        src = str(Path(src).resolve().relative_to(REPO_ROOT))
    except (ValueError, OSError):
        pass
    return {"weights_hash": sae_weights_hash(engine.sae), "fingerprint": engine.sae.key, "source": src,
            "hook": engine.hook_name, "d_sae": int(engine.sae.d_sae)}


def member_descriptions(engine, members: Sequence[int]) -> dict[str, str]:
    """Catalog descriptions of the members when a catalog already exists (never builds one here)."""
    try:
        from esr_core.latents.catalog import load_catalog_for_names

        cat = load_catalog_for_names(engine.model.name, engine.sae)
        if cat is None:
            return {}
        return {str(i): str(cat.description(int(i)) or "") for i in members}
    except Exception as exc:  # the catalog is optional: a missing or stale one must not block the search
        log.info("no catalog descriptions: %s", exc)
        return {}


# ----------------------------------------------------------------------------- the search


def find_detectors(engine, params: DetectorParams | None = None, prompts: list[dict] | None = None,
                   answers: list[str] | None = None, cancel=None,
                   progress: Callable[[float, str], None] | None = None) -> dict:
    """Run the contrastive search and return the "resistance circuit" group (not yet saved)."""
    params = (params or DetectorParams()).validate()
    t0 = time.time()
    if prompts is None or answers is None:
        prompts, answers = load_inputs(params.n_prompts, params.max_answer_chars, params.answers_path)
    elif params.n_prompts:
        prompts, answers = prompts[: params.n_prompts], answers[: params.n_prompts]
    n = len(prompts)
    if n != len(answers) or n < 3:
        raise BadInput("The detector search needs at least 3 prompts, each with one answer")
    topics = [p.get("topic", str(i)) for i, p in enumerate(prompts)] if params.avoid_same_topic else None

    if params.heldout == "prompts":
        rng = np.random.default_rng(12345)
        perm = rng.permutation(n)
        k = max(2, int(round(n * params.heldout_prompt_frac)))
        if n - k < 2:
            raise BadInput("Too few prompts to hold some out; use --heldout derangements")
        search_idx, held_idx = sorted(perm[k:].tolist()), sorted(perm[:k].tolist())
    else:
        search_idx, held_idx = list(range(n)), list(range(n))

    def off_pairs(idx: list[int], seeds: list[int]) -> list[tuple[int, int]]:
        out = []
        for s in seeds:
            sub_topics = [topics[i] for i in idx] if topics else None
            d = derangement(len(idx), s, sub_topics)
            out += [(idx[a], idx[int(d[a])]) for a in range(len(idx))]
        return out

    on_pairs = [(i, i) for i in search_idx]
    off_search = off_pairs(search_idx, params.search_seeds())
    off_held = off_pairs(held_idx, list(params.heldout_seeds))
    on_held = [(i, i) for i in held_idx] if params.heldout == "prompts" else []
    # every distinct pair once
    uniq = list(dict.fromkeys(on_pairs + on_held + off_search + off_held))
    where = {pr: k for k, pr in enumerate(uniq)}
    on_set = set(on_pairs) | set(on_held)

    def prog(done, total):
        if progress:
            progress(done / max(total, 1), f"forward {done}/{total} chats")

    acts = pooled_pairs(engine, [(prompts[i]["prompt"], answers[j]) for i, j in uniq], params.response_only,
                        params.batch_size, keep_tokens=True, cancel=cancel, progress=prog)
    P = acts.pooled
    on = P[[where[p] for p in on_pairs]]
    off = P[[where[p] for p in off_search]]
    auc = rank_auc(off, on)
    st = class_stats(on, off)
    members, thr_used = select_latents(auc, st, params)
    on_h = P[[where[p] for p in (on_held or on_pairs)]]
    off_h = P[[where[p] for p in off_held]]
    auc_h = rank_auc(off_h[:, members], on_h[:, members]) if members else np.zeros(0)

    # alert threshold on the smoothed circuit activity per response token
    def circuit_series(pr) -> np.ndarray | None:
        h = acts.per_token[where[pr]]
        if h is None or h.shape[0] == 0 or not members:
            return None
        z = encode(engine, h)[:, members].numpy()
        return ema(z.sum(axis=1) if params.threshold_how == "sum" else z.mean(axis=1), params.threshold_ema)

    on_series = [x for x in map(circuit_series, on_pairs) if x is not None]
    flat = np.concatenate(on_series) if on_series else np.zeros(1)
    q_value = float(np.quantile(flat, params.threshold_quantile)) if members else 0.0
    thr_info = {"value": q_value}
    basis = (f"{params.threshold_quantile:.0%} quantile of on-topic per-token activity "
             f"(response tokens, {len(on_series)} answers)")
    if members and params.threshold_rule == "youden":
        off_series = [x for x in map(circuit_series, off_search) if x is not None]
        if on_series and off_series:
            thr_info = youden_threshold([x.max() for x in on_series], [x.max() for x in off_series], floor=q_value)
            basis = (f"peak smoothed activity per chat that best separates {len(off_series)} off-topic from "
                     f"{len(on_series)} on-topic chats (Youden's J = TPR - FPR), not below the "
                     f"{params.threshold_quantile:.0%} on-topic token quantile ({q_value:.3g}); "
                     f"alerts on {thr_info['tpr']:.0%} of off-topic and {thr_info['fpr']:.0%} of on-topic chats")
    thr_value = thr_info["value"]

    stats = {}
    for k, i in enumerate(members):
        stats[str(i)] = {"auc": round(float(auc[i]), 4), "auc_heldout": round(float(auc_h[k]), 4),
                         "on_mean": round(float(st["on_mean"][i]), 4), "off_mean": round(float(st["off_mean"][i]), 4),
                         "on_freq": round(float(st["on_freq"][i]), 4), "off_freq": round(float(st["off_freq"][i]), 4)}
    n_auc1 = int(np.sum(auc >= 1.0 - 1e-12))
    rule_txt = (f"AUC >= {thr_used:g}" if params.rule == "auc"
                else f"never fires on on-topic, fires on >= {params.strict_min_off_freq:.0%} of off-topic")
    group = {
        "format": GROUP_FORMAT,
        "name": "resistance circuit",
        "kind": "off-topic detectors",
        "colour": CIRCUIT_COLOUR,
        "members": members,
        "weights": [1.0] * len(members),
        "description": (f"Latents that separate a prompt followed by another prompt's answer from the prompt with "
                        f"its own answer (max-pooled over the {'response' if params.response_only else 'whole chat'}, "
                        f"unsteered; rule: {rule_txt}; {len(on_pairs)} on-topic vs {len(off_search)} off-topic "
                        f"pairs). Method of arXiv 2602.06941 sec. on off-topic detectors."),
        "stats": stats,
        "descriptions": member_descriptions(engine, members),
        "threshold": {"value": round(thr_value, 5), "how": params.threshold_how, "ema_alpha": params.threshold_ema,
                      "rule": params.threshold_rule if "tpr" in thr_info else "quantile",
                      "on_topic_quantile": round(q_value, 5),
                      **({"off_topic_alert_rate": round(thr_info["tpr"], 4),
                          "on_topic_alert_rate": round(thr_info["fpr"], 4)} if "tpr" in thr_info else {}),
                      "on_topic_mean": round(float(flat.mean()), 5) if members else 0.0,
                      "basis": basis},
        "params": dict(params.to_dict(), threshold_used=thr_used),
        "summary": {"n_prompts": n, "inputs_sha1": hashlib.sha1(json.dumps([[p["prompt"] for p in prompts], answers])
                                                                 .encode()).hexdigest()[:12],
                    "n_on": len(on_pairs), "n_off": len(off_search),
                    "n_heldout_off": len(off_held), "n_heldout_on": len(on_h),
                    "n_latents_auc_1": n_auc1, "n_latents_auc_ge_0.9": int(np.sum(auc >= 0.9)),
                    "n_passing_rule": len(members),
                    "mean_auc_heldout": round(float(np.mean(auc_h)), 4) if members else None,
                    "min_auc_heldout": round(float(np.min(auc_h)), 4) if members else None,
                    "top_auc": [[int(i), round(float(auc[i]), 4)] for i in np.argsort(-auc)[:10]],
                    "seconds": round(time.time() - t0, 1)},
        "model": engine.model.name,
        "sae": sae_identity(engine),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return group


# ----------------------------------------------------------------------------- group files


def save_group(group: dict, path: str | Path) -> Path:
    """Write a group atomically (a crash never leaves half a file)."""
    validate_group(group)
    p = Path(path)
    atomic_write_json(p, group)
    return p


def validate_group(group: dict) -> dict:
    if not isinstance(group, dict):
        raise GroupUnavailable("A latent group must be a JSON object")
    members = group.get("members")
    if not isinstance(members, list) or not all(isinstance(i, int) and i >= 0 for i in members):
        raise GroupUnavailable("A latent group needs 'members': a list of latent ids")
    w = group.get("weights") or [1.0] * len(members)
    if len(w) != len(members):
        raise GroupUnavailable("'weights' must have one entry per member")
    group.setdefault("weights", list(map(float, w)))
    group.setdefault("name", "group")
    group.setdefault("colour", CIRCUIT_COLOUR)
    group.setdefault("stats", {})
    return group


def load_group(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise GroupUnavailable(f"Latent group {p} does not exist")
    try:
        g = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GroupUnavailable(f"Latent group {p} is not valid JSON: {exc}") from None
    return validate_group(g)


def shipped_group(which: str = "circuit") -> dict | None:
    """The shipped circuit or backtracking group, or None if not shipped yet."""
    p = CIRCUIT_PATH if which == "circuit" else BACKTRACKING_PATH
    try:
        return load_group(p)
    except GroupUnavailable:
        return None


def group_matches(group: dict, engine) -> bool:
    """True when the group was found on this engine's model and SAE (same decoder weights)."""
    sae = group.get("sae") or {}
    if group.get("model") and group["model"] != engine.model.name:
        return False
    want = sae.get("weights_hash")
    if not want:
        return True
    from esr_core.latents.catalog import sae_weights_hash

    return want == sae_weights_hash(engine.sae)


def group_table(group: dict) -> list[dict]:
    """One row per member for tables (CLI and page): id, description, statistics."""
    rows = []
    desc = group.get("descriptions") or {}
    for i, w in zip(group.get("members", []), group.get("weights", [])):
        row = {"latent": int(i), "weight": float(w), "description": desc.get(str(i), "")}
        row.update(group.get("stats", {}).get(str(i), {}))
        rows.append(row)
    return rows


def fingerprint_group(group: dict) -> str:
    return hashlib.sha1(json.dumps(group.get("members", [])).encode()).hexdigest()[:10]


def cached_group_path(model_name: str, sae_key: str, which: str = "circuit") -> Path:
    """Where a group found for a non-default model/SAE is kept (user cache, never the repo)."""
    from esr_core.paths import cache_subdir

    name = "resistance_circuit" if which == "circuit" else "backtracking"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{model_name}_{sae_key}")
    return cache_subdir("groups") / f"{safe}_{name}.json"


def group_for(engine, which: str = "circuit") -> dict | None:
    """The group for this engine: the shipped one if it matches the SAE, else a cached one, else None."""
    g = shipped_group(which)
    if g is not None and group_matches(g, engine):
        return g
    p = cached_group_path(engine.model.name, engine.sae.key, which)
    if p.exists():
        try:
            g = load_group(p)
            return g if group_matches(g, engine) else None
        except GroupUnavailable:
            return None
    return None
