"""Off-topic detector latents (the "resistance circuit") found by a contrastive search.

ESR_METHOD.md sec. 5 (arXiv 2602.06941): a latent that separates "prompt + its own answer"
from "prompt + someone else's answer" is a candidate for the model's sense that it has gone
off-topic. We render each pair as a [user, assistant] chat, read the SAE code at the hook for
every token (unsteered), max-pool over positions (position 0, the attention sink, never
counts), and score each latent by the rank AUC of off-topic vs on-topic pooled activations.
Off-topic pairs come from seeded derangements of the answers; held-out derangements (or held-
out prompts) check that the chosen latents are not an accident of one pairing. The result is a
:class:`~esr_core.latents.groups.LatentGroup` carrying its evidence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from esr_core.errors import BadInput
from esr_core.jobs import Progress, report_fraction
from esr_core.latents.groups import GROUP_FORMAT, LatentGroup, member_descriptions, sae_identity
from esr_core.models.hooks import capture_batches
from esr_core.resistance.episodes import derangement, load_inputs, render_pair
from esr_core.resistance.signals import class_stats, ema, rank_auc, youden_threshold
from esr_core.viz import palette

log = logging.getLogger(__name__)

RULES = ("auc", "strict")


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


@dataclass
class PairActs:
    """Max-pooled SAE code of many (prompt, answer) chats, plus on-topic per-token codes if kept."""
    pooled: np.ndarray  # [n_pairs, d_sae]
    per_token: list = field(default_factory=list)  # residuals [T_i, d_model] (torch) when keep_tokens


def encode(engine, h, sae=None):
    """SAE code (``sae``, default the engine's steering SAE) of residuals ``h`` [T, d_model] as a
    float32 torch tensor [T, d_sae]."""
    import torch  # heavy: torch, only when a model runs

    with torch.inference_mode():
        return (sae or engine.sae).encode(h.to(engine.device)).float().cpu()


def pooled_pairs(engine, pairs: list[tuple[str, str]], response_only: bool = True, batch_size: int = 8,
                 keep_tokens: bool = False, cancel=None, progress: Progress | None = None,
                 what: str = "chats") -> PairActs:
    """Max-pooled SAE code of each (prompt, answer) chat; optionally keep the pooled residuals."""
    tok = engine.model.tokenizer
    rendered = [render_pair(tok, p, a, response_only) for p, a in pairs]
    pooled = np.zeros((len(pairs), engine.sae.d_sae), dtype=np.float32)
    per_token: list = [None] * len(pairs)
    def on_batch(done: int, total: int) -> None:
        report_fraction(progress, "forward", done / max(total, 1), f"forward {done}/{total} {what}")

    for i, h in capture_batches(engine.model, engine.hook_name, [r[0] for r in rendered], batch_size, cancel,
                                on_batch):
        first = rendered[i][3]
        if first >= h.shape[0]:
            continue  # nothing to pool (empty answer)
        hh = h[first:]
        z = encode(engine, hh)
        pooled[i] = z.max(dim=0).values.numpy()
        if keep_tokens:
            per_token[i] = hh.cpu()
    return PairActs(pooled=pooled, per_token=per_token if keep_tokens else [])


def find_detectors(engine, params: DetectorParams | None = None, prompts: list[dict] | None = None,
                   answers: list[str] | None = None, cancel=None,
                   progress: Progress | None = None) -> LatentGroup:
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

    acts = pooled_pairs(engine, [(prompts[i]["prompt"], answers[j]) for i, j in uniq], params.response_only,
                        params.batch_size, keep_tokens=True, cancel=cancel, progress=progress)
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
        "colour": palette.CIRCUIT,
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
    return LatentGroup.from_dict(group)
