"""Token-level off-topic detectors: a search that is validated per token and against controls.

Why: the first circuit was chosen by max-pooling each answer (``detectors.py``), so a latent
that fires once anywhere in an off-topic answer scored as well as one that is active during
the whole off-topic span, and nothing separated "off-topic" from "a particular token", "the
start of a segment", "the system prompt" or "garbled text". Here every response token is a
sample (the system and user turns never count, position 0 never does):

- on-topic: a prompt with its own unsteered answer;
- off-topic, two ways: a synthetic recovery (the answer's first sentence, then another
  prompt's answer, a restart sentence and the own answer: the drift span is off-topic, the
  span after the restart is the "after correction" region) and the model's own steered drift
  (text it wrote with a distractor latent added, read back unsteered);
- controls: the on-topic answer garbled (words shuffled; the first words repeated), the
  system prompt's tokens, and strata by token id and by distance from the segment start.

A candidate must separate off-topic from on-topic tokens (rank AUC), still do so within
tokens of the same id and within the same distance from a segment start (stratified AUC),
not fire on garbled on-topic text more than on clean text, and stay quieter on the system
prompt than on off-topic text. Prompts are split by id: the group is chosen on one part and
every reported number is measured on the other. Region ratios are against unsteered on-topic
activity, as in the paper (ESR_METHOD.md sec. 5: 4.4x off-topic, 2.1x after correction).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from esr_core.errors import BadInput
from esr_core.jobs import Progress, report_fraction
from esr_core.models.hooks import capture_batches
from esr_core.resistance.episodes import render_pair
from esr_core.resistance.signals import rank_auc
from esr_core.resistance.token_inputs import CLASSES, Chat, load_detector_inputs, make_chats, split_prompts

SEG_CAP = 12  # distance-from-segment-start strata: 0..11 and "12 or more"


@dataclass
class TokenSearchParams:
    """Everything that decides the result; stored with it so the command reproduces it."""
    n_prompts: int | None = None  # None: all prompts of the inputs file
    heldout_frac: float = 0.3
    split_seed: int = 0
    max_answer_chars: int = 600
    n_candidates: int = 300  # latents (best plain token AUC) that get the control tests
    min_off_rate: float = 0.01  # active on at least this share of off-topic tokens
    min_selectivity: float = 2.0  # ... and at least this many times as often as on on-topic tokens
    min_matched_share: float = 0.5  # AUC excess (AUC - 0.5) kept within token-id / segment-position strata
    max_garbled_share: float = 0.5  # garbled-vs-clean AUC excess, as a share of the off-topic excess
    max_system_ratio: float = 0.5  # mean on the system prompt / mean on off-topic tokens
    max_steering_share: float = 0.5  # steering-alone-vs-clean AUC excess, as a share of the off-topic excess
    max_size: int = 26  # the paper's final set had 26 latents
    min_gain: float = 0.002  # a member joins only if it raises the group's per-token AUC this much
    unsteered_quantile: float = 0.95  # threshold: this quantile of on-topic answers' peak activity
    ema_alpha: float = 0.5
    batch_size: int = 8

    def validate(self) -> "TokenSearchParams":
        if not 0.05 <= self.heldout_frac <= 0.8:
            raise BadInput(f"heldout_frac must be in [0.05, 0.8], got {self.heldout_frac}")
        if not 1 <= self.max_size <= 200:
            raise BadInput(f"max_size must be in 1..200, got {self.max_size}")
        if not 0.5 <= self.unsteered_quantile < 1.0:
            raise BadInput(f"unsteered_quantile must be in [0.5, 1), got {self.unsteered_quantile}")
        if self.n_prompts is not None and self.n_prompts < 6:
            raise BadInput("The token-level search needs at least 6 prompts")
        return self


# ---------------------------------------------------------------------------- reading codes
@dataclass
class TokenCodes:
    """Sparse SAE codes of every response token (and the system tokens) at one or more hooks."""
    codes: dict  # hook -> scipy.sparse.csc_matrix [N, d_sae]
    sys_codes: dict  # hook -> csc [N_sys, d_sae]
    chat: np.ndarray  # [N] chat index
    cls: np.ndarray  # [N] class index into CLASSES
    token: np.ndarray  # [N] token id
    seg: np.ndarray  # [N] distance from the segment start, capped at SEG_CAP
    chats: list


def _token_classes(chat: Chat, offs, resp_char: int, first: int) -> list[int]:
    out = []
    for s, e in offs[first:]:
        c = s - resp_char
        k = next((CLASSES.index(lab) for a, b, lab in chat.spans if a <= c < b), None)
        if k is None:  # a token straddling a boundary or trailing template text: its span's end wins
            k = CLASSES.index(chat.spans[-1][2]) if c >= chat.spans[-1][1] else CLASSES.index(chat.spans[0][2])
        out.append(k)
    return out


def _segment_positions(tokenizer, ids: Sequence[int], first: int) -> list[int]:
    """Tokens since the last segment start (the response start, a newline or a sentence end)."""
    out, k = [], 0
    for t in range(first, len(ids)):
        out.append(min(k, SEG_CAP))
        piece = tokenizer.decode([ids[t]])
        k = 0 if ("\n" in piece or piece.rstrip().endswith((".", "!", "?"))) else k + 1
    return out


def steering_vectors(chats: Sequence[Chat], steer_sae):
    """``(hook, [N, d_model])``: each chat's steering (coefficient x decoder row), zero when it has none."""
    import torch  # heavy: torch, only when a model runs

    if not any(c.steer for c in chats):
        return None
    if steer_sae is None:
        raise BadInput("These inputs record the steering of their drifts: name the steering SAE to read them live")
    W = steer_sae.W_dec.detach().float().cpu()
    vecs = torch.zeros(len(chats), W.shape[1])
    for k, c in enumerate(chats):
        if c.steer:
            lat, coef = c.steer
            if not 0 <= int(lat) < W.shape[0]:
                raise BadInput(f"Drift latent {lat} does not exist in the steering SAE ({W.shape[0]} latents)")
            vecs[k] = float(coef) * W[int(lat)]
    return steer_sae.hook_name, vecs


def read_codes(model, saes: Sequence, chats: Sequence[Chat], batch_size: int = 8, cancel=None,
               progress: Progress | None = None, steer_sae=None) -> TokenCodes:
    """SAE codes of every response and system token, all hooks in one forward pass.

    A chat with a recorded ``steer`` is read with that steering added at ``steer_sae``'s hook
    at every position (the live condition); the others are read unsteered.
    """
    import torch  # heavy: torch, only when a model runs
    from scipy import sparse  # heavy: scipy, only when codes are read

    tok = model.tokenizer
    rendered = [render_pair(tok, c.prompt, c.response, True) for c in chats]
    hooks = list(dict.fromkeys(s.hook_name for s in saes))
    by_hook = {s.hook_name: s for s in saes}
    add = steering_vectors(chats, steer_sae)
    parts = {h: [] for h in hooks}
    sys_parts = {h: [] for h in hooks}
    meta = {"chat": [], "cls": [], "token": [], "seg": []}
    order = []

    def on_batch(done, total):
        report_fraction(progress, "forward", done / max(total, 1), f"forward {done}/{total} chats")

    for i, hs in capture_batches(model, hooks, [r[0] for r in rendered], batch_size, cancel, on_batch, add=add):
        ids, offs, text, first = rendered[i]
        resp_char = text.find(chats[i].response) if chats[i].response else -1
        if resp_char < 0 or first >= len(ids):
            continue
        u = text.find("<|im_start|>user")
        sys_end = next((t for t, (s, e) in enumerate(offs) if s >= u), 1) if u > 0 else 1
        order.append(i)
        for h in hooks:
            with torch.inference_mode():
                z = by_hook[h].encode(hs[h].to(by_hook[h].W_dec.device)).float().cpu().numpy()
            parts[h].append(sparse.csr_matrix(z[first:]))
            sys_parts[h].append(sparse.csr_matrix(z[1:sys_end]) if sys_end > 1 else None)
        cls = _token_classes(chats[i], offs, resp_char, first)
        meta["chat"] += [i] * len(cls)
        meta["cls"] += cls
        meta["token"] += list(ids[first:])
        meta["seg"] += _segment_positions(tok, ids, first)
    if not order:
        raise BadInput("No chat had any response token")
    # capture_batches yields by length; keep the meta order, which follows the same sequence
    codes = {h: sparse.vstack(parts[h]).tocsc() for h in hooks}
    sys_codes = {h: (sparse.vstack([m for m in sys_parts[h] if m is not None]).tocsc()
                     if any(m is not None for m in sys_parts[h]) else None) for h in hooks}
    return TokenCodes(codes=codes, sys_codes=sys_codes, chat=np.asarray(meta["chat"]), cls=np.asarray(meta["cls"]),
                      token=np.asarray(meta["token"]), seg=np.asarray(meta["seg"]), chats=list(chats))


# ---------------------------------------------------------------------------- statistics
def sparse_auc(M, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Per-column rank AUC of rows ``pos`` vs rows ``neg`` of a sparse non-negative matrix.

    Zeros tie with zeros (half credit); a column that is zero everywhere scores exactly 0.5.
    """
    P, N = M[pos].tocsc(), M[neg].tocsc()
    n_p, n_n = P.shape[0], N.shape[0]
    if n_p == 0 or n_n == 0:
        raise BadInput("AUC needs at least one token in each class")
    out = np.full(M.shape[1], 0.5)
    for j in range(M.shape[1]):
        x = P.data[P.indptr[j]:P.indptr[j + 1]]
        y = np.sort(N.data[N.indptr[j]:N.indptr[j + 1]])
        if x.size == 0 and y.size == 0:
            continue
        zy = n_n - y.size
        lo, hi = np.searchsorted(y, x, "left"), np.searchsorted(y, x, "right")
        wins = np.sum(zy + lo + 0.5 * (hi - lo)) + 0.5 * (n_p - x.size) * zy
        out[j] = wins / (n_p * n_n)
    return out


def stratified_auc(x: np.ndarray, is_pos: np.ndarray, strata: np.ndarray) -> np.ndarray:
    """AUC of positives vs negatives counting only pairs in the same stratum, per column of ``x``.

    A latent that fires on one token id regardless of topic scores 0.5 when the strata are
    token ids: within that token's stratum on- and off-topic tokens fire alike.
    """
    from scipy.stats import rankdata  # heavy: scipy.stats takes ~1 s to import

    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    wins = np.zeros(x.shape[1])
    pairs = 0.0
    for s in np.unique(strata):
        m = strata == s
        a, b = int(np.sum(m & is_pos)), int(np.sum(m & ~is_pos))
        if a == 0 or b == 0:
            continue
        sub = x[m]
        r = rankdata(sub, axis=0)
        wins += r[is_pos[m]].sum(axis=0) - a * (a + 1) / 2.0
        pairs += a * b
    return wins / pairs if pairs else np.full(x.shape[1], 0.5)


def dense_cols(M, rows: np.ndarray, cols: Sequence[int]) -> np.ndarray:
    return np.asarray(M[rows][:, list(cols)].todense(), dtype=np.float64)


def ema_by_chat(x: np.ndarray, chat: np.ndarray, alpha: float) -> np.ndarray:
    """The live signal: EMA (s_0 = x_0) restarted at every chat, vectorised per chat."""
    from scipy.signal import lfilter  # heavy: scipy

    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    if alpha is None or alpha >= 1.0:
        return x.copy()
    bounds = np.flatnonzero(np.diff(chat)) + 1
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(x)]):
        seg = x[a:b]
        out[a:b] = lfilter([alpha], [1.0, -(1.0 - alpha)], seg, zi=[(1.0 - alpha) * seg[0]])[0]
    return out


def chat_peaks(series: np.ndarray, chat: np.ndarray, alpha: float, mask: np.ndarray | None = None) -> dict[int, float]:
    """Peak EMA-smoothed activity of each chat (over the tokens in ``mask`` when given)."""
    sm = ema_by_chat(series, chat, alpha)
    keep = np.ones(len(sm), bool) if mask is None else np.asarray(mask, bool)
    out: dict[int, float] = {}
    for c, v in zip(chat[keep], sm[keep]):
        out[int(c)] = max(out.get(int(c), -np.inf), float(v))
    return out


def _cls_mask(codes: TokenCodes, names: Sequence[str]) -> np.ndarray:
    return np.isin(codes.cls, [CLASSES.index(n) for n in names])


def evaluate_group(codes: TokenCodes, hook: str, members: Sequence[int], rows_mask: np.ndarray,
                   threshold: float, alpha: float = 0.5) -> dict:
    """Per-token AUCs, crossing rates and region ratios of a group on the tokens in ``rows_mask``."""
    M = codes.codes[hook]
    s = np.asarray(M[:, list(members)].sum(axis=1)).ravel() if members else np.zeros(M.shape[0])
    smooth = ema_by_chat(s, codes.chat, alpha)
    kinds = np.array([codes.chats[c].kind for c in codes.chat])
    on = _cls_mask(codes, ["on"]) & rows_mask
    res: dict = {}
    for name, cl in (("off_topic", ["off", "drift"]), ("recovery_drift", ["off"]), ("steered_drift", ["drift"]),
                     ("garbled", ["shuffle", "repeat"]), ("steering_only", ["steer_only"])):
        m = _cls_mask(codes, cl) & rows_mask
        ok = bool(m.any() and on.any())
        if not ok and name == "steering_only":  # inputs read unsteered have no such control
            continue
        res[f"token_auc_{name}"] = round(float(rank_auc(smooth[m], smooth[on])[0]), 4) if ok else None
        res[f"raw_token_auc_{name}"] = round(float(rank_auc(s[m], s[on])[0]), 4) if ok else None
    on_mean = float(s[on].mean()) if on.any() else 0.0
    res["on_topic_mean"] = round(on_mean, 5)

    def ratio(cl):
        m = _cls_mask(codes, cl) & rows_mask
        return round(float(s[m].mean()) / on_mean, 3) if m.any() and on_mean > 0 else None

    res["ratio_off_topic"] = ratio(["off"])
    res["ratio_after_correction"] = ratio(["after"])
    res["ratio_steered_drift"] = ratio(["drift"])
    res["ratio_garbled"] = ratio(["shuffle", "repeat"])
    if _cls_mask(codes, ["steer_only"]).any():
        res["ratio_steering_only"] = ratio(["steer_only"])
    sys_m = codes.sys_codes.get(hook)
    res["system_mean"] = (round(float(np.asarray(sys_m[:, list(members)].sum(axis=1)).mean()), 5)
                          if sys_m is not None and members else None)
    sel = rows_mask
    for name, kind, cl in (("unsteered", "on", None), ("recovery_drift", "recovery", ["off"]),
                           ("steered_drift", "drift", None), ("shuffled", "shuffle", None),
                           ("repeated", "repeat", None), ("steering_only", "steer_only", None)):
        m = sel & (kinds == kind)
        if not m.any() and kind == "steer_only":
            continue
        if not m.any():
            res[f"crossing_rate_{name}"] = None
            continue
        mask = _cls_mask(codes, cl) if cl else None
        idx = np.where(m)[0]
        peaks = chat_peaks(s[idx], codes.chat[idx], alpha, None if mask is None else mask[idx])
        res[f"crossing_rate_{name}"] = round(float(np.mean([v > threshold for v in peaks.values()])), 4)
        res[f"n_{name}"] = len(peaks)
    return res


def search_layer(codes: TokenCodes, hook: str, search_rows: set[int], params: TokenSearchParams,
                 progress: Progress | None = None) -> dict:
    """Candidates, their controls, the chosen group and its threshold at one hook."""
    M = codes.codes[hook]
    row_of = np.array([codes.chats[c].row for c in codes.chat])
    in_search = np.isin(row_of, list(search_rows))
    on = np.where(_cls_mask(codes, ["on"]) & in_search)[0]
    off = np.where(_cls_mask(codes, ["off", "drift"]) & in_search)[0]
    garbled = np.where(_cls_mask(codes, ["shuffle", "repeat"]) & in_search)[0]
    steer_only = np.where(_cls_mask(codes, ["steer_only"]) & in_search)[0]
    report_fraction(progress, "search", 0.0, f"{hook}: token AUC of {M.shape[1]} latents")
    auc = sparse_auc(M, off, on)
    mean_on = np.asarray(M[on].mean(axis=0)).ravel()
    mean_off = np.asarray(M[off].mean(axis=0)).ravel()
    order = [int(j) for j in np.argsort(-auc) if mean_off[j] > mean_on[j]][: params.n_candidates]
    report_fraction(progress, "search", 0.4, f"{hook}: controls for {len(order)} candidates")
    both = np.concatenate([off, on])
    is_pos = np.concatenate([np.ones(len(off), bool), np.zeros(len(on), bool)])
    X = dense_cols(M, both, order)
    tok_auc = stratified_auc(X, is_pos, codes.token[both])
    seg_auc = stratified_auc(X, is_pos, codes.seg[both])
    G = dense_cols(M, np.concatenate([garbled, on]), order)
    garb_auc = rank_auc(G[: len(garbled)], G[len(garbled):])
    if len(steer_only):  # live inputs: the on-topic answer read with the drift's steering on
        S = dense_cols(M, np.concatenate([steer_only, on]), order)
        steer_auc = rank_auc(S[: len(steer_only)], S[len(steer_only):])
    else:
        steer_auc = np.full(len(order), np.nan)
    sys_m = codes.sys_codes.get(hook)
    sys_mean = (np.asarray(sys_m[:, order].mean(axis=0)).ravel() if sys_m is not None else np.zeros(len(order)))
    rate_on = np.asarray((M[on] > 0).mean(axis=0)).ravel()
    rate_off = np.asarray((M[off] > 0).mean(axis=0)).ravel()
    cands = []
    for k, j in enumerate(order):
        ex = float(auc[j]) - 0.5
        c = {"latent": j, "auc": round(float(auc[j]), 4), "token_matched_auc": round(float(tok_auc[k]), 4),
             "position_matched_auc": round(float(seg_auc[k]), 4), "garbled_auc": round(float(garb_auc[k]), 4),
             "steering_auc": None if np.isnan(steer_auc[k]) else round(float(steer_auc[k]), 4),
             "system_ratio": round(float(sys_mean[k] / mean_off[j]), 4) if mean_off[j] > 0 else None,
             "off_rate": round(float(rate_off[j]), 4), "on_rate": round(float(rate_on[j]), 4),
             "on_mean": round(float(mean_on[j]), 4), "off_mean": round(float(mean_off[j]), 4)}
        why = []
        if rate_off[j] < params.min_off_rate or rate_off[j] < params.min_selectivity * rate_on[j]:
            why.append("not selective for off-topic tokens")
        if ex <= 0 or tok_auc[k] - 0.5 < params.min_matched_share * ex:
            why.append("explained by the token")
        if ex <= 0 or seg_auc[k] - 0.5 < params.min_matched_share * ex:
            why.append("explained by the segment position")
        if garb_auc[k] - 0.5 > params.max_garbled_share * max(ex, 0.0):
            why.append("fires on garbled text")
        if not np.isnan(steer_auc[k]) and steer_auc[k] - 0.5 > params.max_steering_share * max(ex, 0.0):
            why.append("fires on the steering alone")
        if c["system_ratio"] is not None and c["system_ratio"] > params.max_system_ratio:
            why.append("fires on the system prompt")
        c["rejected_by"] = why
        cands.append(c)
    passing = sorted([c for c in cands if not c["rejected_by"]],
                     key=lambda c: -c["auc"])
    report_fraction(progress, "search", 0.7, f"{hook}: {len(passing)} pass the controls; building the group")
    members: list[int] = []
    best = 0.5
    total = np.zeros(M.shape[0])
    for c in passing:  # greedy on the live signal: the EMA of the group's summed activity, per chat
        trial_sum = total + np.asarray(M[:, c["latent"]].todense()).ravel()
        s = ema_by_chat(trial_sum, codes.chat, params.ema_alpha)[both]
        a = float(rank_auc(s[is_pos], s[~is_pos])[0])
        if a >= best + params.min_gain:
            members, best, total = members + [c["latent"]], a, trial_sum
        if len(members) >= params.max_size:
            break
    # alert threshold: the unsteered_quantile of on-topic answers' peak smoothed activity (search split)
    s_all = np.asarray(M[:, members].sum(axis=1)).ravel() if members else np.zeros(M.shape[0])
    on_idx = on
    peaks = chat_peaks(s_all[on_idx], codes.chat[on_idx], params.ema_alpha)
    thr = float(np.quantile(list(peaks.values()), params.unsteered_quantile)) if peaks and members else 0.0
    rejected = {}
    for c in cands:
        for w in c["rejected_by"]:
            rejected[w] = rejected.get(w, 0) + 1
    return {"hook": hook, "members": members, "search_token_auc": round(best, 4), "threshold": round(thr, 5),
            "n_candidates": len(cands), "n_passing": len(passing), "rejected": rejected,
            "candidates": cands, "top_plain_auc": [[int(j), round(float(auc[j]), 4)] for j in np.argsort(-auc)[:10]]}


def run_search(model, saes: Sequence, params: TokenSearchParams | None = None, rows: list[dict] | None = None,
               inputs_path: str | Path | None = None, baselines: dict[str, dict] | None = None, cancel=None,
               progress: Progress | None = None, steer_sae=None) -> dict:
    """Search every SAE's hook, evaluate on held-out prompts, compare with ``baselines``.

    ``steer_sae``: the SAE the drifts were steered through, needed when the inputs record their
    steering (live inputs, read with the steering on).

    ``baselines``: ``{hook: {"name", "members", "threshold"}}`` (e.g. today's circuit), measured
    on the same held-out tokens with the same functions.
    """
    params = (params or TokenSearchParams()).validate()
    t0 = time.time()
    rows = rows if rows is not None else load_detector_inputs(inputs_path, params.n_prompts)
    rows = [dict(r, answer=r["answer"][: params.max_answer_chars]) for r in rows]
    search_idx, held_idx = split_prompts(rows, params.heldout_frac, params.split_seed)
    chats = make_chats(rows, params.split_seed)
    codes = read_codes(model, saes, chats, params.batch_size, cancel, progress, steer_sae=steer_sae)
    row_of = np.array([codes.chats[c].row for c in codes.chat])
    held = np.isin(row_of, held_idx)
    layers = []
    for sae in saes:
        res = search_layer(codes, sae.hook_name, set(search_idx), params, progress)
        res["heldout"] = evaluate_group(codes, sae.hook_name, res["members"], held, res["threshold"], params.ema_alpha)
        res["sae"] = {"source": str(sae.source), "hook": sae.hook_name, "d_sae": int(sae.d_sae),
                      "fingerprint": sae.key}
        base = (baselines or {}).get(sae.hook_name)
        if base:
            res["baseline"] = {"name": base["name"], "members": list(base["members"]),
                               "threshold": base["threshold"],
                               "heldout": evaluate_group(codes, sae.hook_name, base["members"], held,
                                                         float(base["threshold"]), params.ema_alpha)}
        layers.append(res)
    kinds = [c.kind for c in chats]
    live = any(c.steer for c in chats)
    def drift_latents(idx):
        return {int(rows[i]["drift_latent"]) for i in idx if rows[i].get("drift") and "drift_latent" in rows[i]}

    lat_search, lat_held = drift_latents(search_idx), drift_latents(held_idx)
    return {"format": "esr-token-detectors-v1", "params": asdict(params), "model": model.name,
            "drifts_read": "with their steering on" if live else "unsteered",
            # True when no held-out drift was steered by a latent that a search drift was steered by
            "distractors_held_out": bool(lat_held) and not (lat_held & lat_search),
            "n_drift_latents": {"search": len(lat_search), "heldout": len(lat_held)},
            **({"steering_sae": {"source": str(steer_sae.source), "hook": steer_sae.hook_name}} if live else {}),
            "n_prompts": len(rows), "n_search": len(search_idx), "n_heldout": len(held_idx),
            "heldout_ids": [rows[i]["id"] for i in held_idx],
            "n_chats": {k: kinds.count(k) for k in dict.fromkeys(kinds)}, "n_tokens": int(len(codes.cls)),
            "inputs_sha1": hashlib.sha1(json.dumps([[r["id"], r["prompt"], r["answer"], r.get("drift", "")]
                                                    + ([r.get("drift_latent"), r.get("drift_boost")] if live else [])
                                                    for r in rows]).encode()).hexdigest()[:12],
            "layers": layers, "seconds": round(time.time() - t0, 1)}


