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
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from esr_core.errors import BadInput
from esr_core.io import atomic_write_json
from esr_core.jobs import Progress, report_fraction
from esr_core.paths import ASSETS_DIR
from esr_core.resistance.episodes import derangement, sentences, splice
from esr_core.viz import palette

INPUTS_PATH = ASSETS_DIR / "prompts" / "detector_inputs.jsonl"
SEG_CAP = 12  # distance-from-segment-start strata: 0..11 and "12 or more"
RESTARTS = ("Wait, that's not what you asked.", "Actually, I got off track.", "Let me start over.",
            "Back to your question.")
CLASSES = ("on", "ctx", "off", "restart", "after", "drift", "shuffle", "repeat")


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


# ---------------------------------------------------------------------------- inputs
def load_detector_inputs(path: str | Path | None = None, n_prompts: int | None = None) -> list[dict]:
    """Rows ``{id, prompt, answer, drift?, drift_latent?}`` (JSONL); a clear error when unusable."""
    p = Path(path or INPUTS_PATH)
    if not p.exists():
        raise BadInput(f"Detector inputs {p} do not exist (build them with `esr-lab resistance inputs`)")
    rows = []
    for k, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{p} line {k + 1} is not JSON: {exc}") from None
        if not isinstance(r, dict) or not all(isinstance(r.get(f), str) and r[f].strip()
                                              for f in ("id", "prompt", "answer")):
            raise BadInput(f"{p} line {k + 1}: every row needs non-empty string 'id', 'prompt' and 'answer'")
        rows.append(r)
    if n_prompts:
        rows = rows[: int(n_prompts)]
    if len(rows) < 6:
        raise BadInput(f"{p}: the token-level search needs at least 6 prompts, found {len(rows)}")
    return rows


def build_detector_inputs(answers: Sequence[dict], drifts: Sequence[dict], out: str | Path,
                          max_answer_chars: int = 600, off_topic_below: float = 30.0) -> dict:
    """Write the inputs file from the fine-tuning data's unsteered answers and steered drifts.

    ``answers``: ``{key, prompt, text}`` (the base model's own answers to training prompts);
    ``drifts``: ``{pid, text, latent, score}`` (its continuations under a distractor latent),
    kept only where the judge scored them off-topic (score below ``off_topic_below``).
    """
    drift_of: dict[str, dict] = {}
    for d in drifts:
        if float(d.get("score", 100)) < off_topic_below and d.get("text", "").strip():
            drift_of.setdefault(str(d["pid"]), d)
    rows = []
    for a in answers:
        if not a.get("text", "").strip():
            continue
        d = drift_of.get(str(a["key"]))
        rows.append({"id": str(a["key"]), "prompt": a["prompt"], "answer": a["text"][:max_answer_chars],
                     **({"drift": d["text"], "drift_latent": int(d["latent"]), "drift_score": float(d["score"])}
                        if d else {})})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(out) + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    return {"rows": len(rows), "with_drift": sum(1 for r in rows if "drift" in r)}


def garble(answer: str, how: str, seed: int) -> str:
    """On-topic text made degenerate: its words shuffled, or its first words repeated."""
    words = answer.split()
    if how == "shuffle":
        random.Random(seed).shuffle(words)
        return " ".join(words)
    if how == "repeat":
        head = words[: max(1, min(6, len(words)))]
        return " ".join((head * (len(words) // len(head) + 1))[: len(words)])
    raise BadInput(f"Unknown garbling {how!r}")


def split_prompts(rows: Sequence[dict], frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(search, held-out) row indices, split by a hash of the prompt id (stable under reordering)."""
    def h(r):
        return int(hashlib.sha1(f"{seed}:{r['id']}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    held = [i for i, r in enumerate(rows) if h(r) < frac]
    search = [i for i, r in enumerate(rows) if h(r) >= frac]
    if len(held) < 3 or len(search) < 3:
        raise BadInput("Too few prompts on one side of the search / held-out split")
    return search, held


@dataclass
class Chat:
    """One [user, assistant] chat and the class of every character span of the response."""
    row: int
    kind: str  # on | recovery | drift | shuffle | repeat
    prompt: str
    response: str
    spans: list[tuple[int, int, str]]  # (start char, end char, class) within the response


def make_chats(rows: Sequence[dict], seed: int = 0) -> list[Chat]:
    """The on-topic, off-topic and garbled chats of every row (see the module docstring)."""
    n = len(rows)
    d = derangement(n, seed)
    chats = []
    for i, r in enumerate(rows):
        ans = r["answer"].strip()
        chats.append(Chat(i, "on", r["prompt"], ans, [(0, len(ans), "on")]))
        other = rows[int(d[i])]["answer"].strip()
        if sentences(ans) and sentences(other):
            restart = RESTARTS[i % len(RESTARTS)]
            text, (r0, r1) = splice(ans, other, restart, start_sentences=1, drift_sentences=3)
            start = len(sentences(ans)[0]) + 1
            chats.append(Chat(i, "recovery", r["prompt"], text,
                              [(0, start, "ctx"), (start, r0, "off"), (r0, r1, "restart"), (r1, len(text), "after")]))
        if r.get("drift", "").strip():
            dr = r["drift"].strip()
            chats.append(Chat(i, "drift", r["prompt"], dr, [(0, len(dr), "drift")]))
        for how in ("shuffle", "repeat"):
            g = garble(ans, how, seed + i)
            chats.append(Chat(i, how, r["prompt"], g, [(0, len(g), how)]))
    return chats


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


def read_codes(model, saes: Sequence, chats: Sequence[Chat], batch_size: int = 8, cancel=None,
               progress: Progress | None = None) -> TokenCodes:
    """Unsteered SAE codes of every response and system token, all hooks in one forward pass."""
    import torch  # heavy: torch, only when a model runs
    from scipy import sparse

    from esr_core.models.hooks import capture_batches
    from esr_core.resistance.episodes import render_pair

    tok = model.tokenizer
    rendered = [render_pair(tok, c.prompt, c.response, True) for c in chats]
    hooks = list(dict.fromkeys(s.hook_name for s in saes))
    by_hook = {s.hook_name: s for s in saes}
    parts = {h: [] for h in hooks}
    sys_parts = {h: [] for h in hooks}
    meta = {"chat": [], "cls": [], "token": [], "seg": []}
    order = []

    def on_batch(done, total):
        report_fraction(progress, "forward", done / max(total, 1), f"forward {done}/{total} chats")

    for i, hs in capture_batches(model, hooks, [r[0] for r in rendered], batch_size, cancel, on_batch):
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
    from scipy.stats import rankdata

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
    from scipy.signal import lfilter

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
    from esr_core.resistance.signals import rank_auc

    M = codes.codes[hook]
    s = np.asarray(M[:, list(members)].sum(axis=1)).ravel() if members else np.zeros(M.shape[0])
    smooth = ema_by_chat(s, codes.chat, alpha)
    kinds = np.array([codes.chats[c].kind for c in codes.chat])
    on = _cls_mask(codes, ["on"]) & rows_mask
    res: dict = {}
    for name, cl in (("off_topic", ["off", "drift"]), ("recovery_drift", ["off"]), ("steered_drift", ["drift"]),
                     ("garbled", ["shuffle", "repeat"])):
        m = _cls_mask(codes, cl) & rows_mask
        ok = bool(m.any() and on.any())
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
    sys_m = codes.sys_codes.get(hook)
    res["system_mean"] = (round(float(np.asarray(sys_m[:, list(members)].sum(axis=1)).mean()), 5)
                          if sys_m is not None and members else None)
    sel = rows_mask
    for name, kind, cl in (("unsteered", "on", None), ("recovery_drift", "recovery", ["off"]),
                           ("steered_drift", "drift", None), ("shuffled", "shuffle", None), ("repeated", "repeat", None)):
        m = sel & (kinds == kind)
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
    from esr_core.resistance.signals import rank_auc

    garb_auc = rank_auc(G[: len(garbled)], G[len(garbled):])
    sys_m = codes.sys_codes.get(hook)
    sys_mean = (np.asarray(sys_m[:, order].mean(axis=0)).ravel() if sys_m is not None else np.zeros(len(order)))
    rate_on = np.asarray((M[on] > 0).mean(axis=0)).ravel()
    rate_off = np.asarray((M[off] > 0).mean(axis=0)).ravel()
    cands = []
    for k, j in enumerate(order):
        ex = float(auc[j]) - 0.5
        c = {"latent": j, "auc": round(float(auc[j]), 4), "token_matched_auc": round(float(tok_auc[k]), 4),
             "position_matched_auc": round(float(seg_auc[k]), 4), "garbled_auc": round(float(garb_auc[k]), 4),
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
               progress: Progress | None = None) -> dict:
    """Search every SAE's hook, evaluate on held-out prompts, compare with ``baselines``.

    ``baselines``: ``{hook: {"name", "members", "threshold"}}`` (e.g. today's circuit), measured
    on the same held-out tokens with the same functions.
    """
    params = (params or TokenSearchParams()).validate()
    t0 = time.time()
    rows = rows if rows is not None else load_detector_inputs(inputs_path, params.n_prompts)
    rows = [dict(r, answer=r["answer"][: params.max_answer_chars]) for r in rows]
    search_idx, held_idx = split_prompts(rows, params.heldout_frac, params.split_seed)
    chats = make_chats(rows, params.split_seed)
    codes = read_codes(model, saes, chats, params.batch_size, cancel, progress)
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
    return {"format": "esr-token-detectors-v1", "params": asdict(params), "model": model.name,
            "n_prompts": len(rows), "n_search": len(search_idx), "n_heldout": len(held_idx),
            "heldout_ids": [rows[i]["id"] for i in held_idx],
            "n_chats": {k: kinds.count(k) for k in dict.fromkeys(kinds)}, "n_tokens": int(len(codes.cls)),
            "inputs_sha1": hashlib.sha1(json.dumps([[r["id"], r["prompt"], r["answer"], r.get("drift", "")]
                                                    for r in rows]).encode()).hexdigest()[:12],
            "layers": layers, "seconds": round(time.time() - t0, 1)}


def best_layer(report: dict) -> dict:
    """The layer whose group separates best on held-out tokens within the crossing goal (<= 5 %)."""
    def key(layer):
        h = layer["heldout"]
        ok = (h.get("crossing_rate_unsteered") or 1.0) <= 0.05 + 1e-9
        return (ok, h.get("token_auc_off_topic") or 0.0)
    usable = [la for la in report["layers"] if la["members"]]
    if not usable:
        raise BadInput("No layer produced a group that passes the controls")
    return max(usable, key=key)


def group_dict(report: dict, layer: dict, descriptions: dict[str, str], sae_identity: dict) -> dict:
    """The shipped circuit group (LatentGroup format) with its evidence and controls."""
    from esr_core.latents.groups import GROUP_FORMAT

    cand = {c["latent"]: c for c in layer["candidates"]}
    h = layer["heldout"]
    return {
        "format": GROUP_FORMAT, "name": "resistance circuit", "kind": "off-topic detectors",
        "colour": palette.CIRCUIT, "members": layer["members"], "weights": [1.0] * len(layer["members"]),
        "description": (f"Latents active during off-topic spans of answers and quiet on on-topic answers, chosen per "
                        f"response token at {layer['hook']} on {report['n_search']} prompts and measured on "
                        f"{report['n_heldout']} held-out prompts; each passes the token-id, segment-position, "
                        f"garbling and system-prompt controls (see evidence)."),
        "stats": {str(j): {k: cand[j][k] for k in ("auc", "token_matched_auc", "position_matched_auc", "garbled_auc",
                                                    "system_ratio", "on_mean", "off_mean")} for j in layer["members"]},
        "descriptions": descriptions,
        "threshold": {"value": layer["threshold"], "how": "sum", "ema_alpha": report["params"]["ema_alpha"],
                      "rule": "unsteered quantile",
                      "basis": (f"{report['params']['unsteered_quantile']:.0%} quantile of the peak smoothed activity "
                                f"of on-topic answers (search split); held out it alerts on "
                                f"{h.get('crossing_rate_unsteered', 0):.0%} of unsteered answers"),
                      "on_topic_mean": h.get("on_topic_mean")},
        "evidence": {"heldout": h, "baseline": layer.get("baseline"), "rejected": layer["rejected"],
                     "n_candidates": layer["n_candidates"], "n_passing": layer["n_passing"],
                     "search_token_auc": layer["search_token_auc"]},
        "params": report["params"],
        "layers": [{k: v for k, v in r.items() if k != "members"} for r in report.get("layer_table") or []],
        "summary": {"n_prompts": report["n_prompts"], "n_heldout": report["n_heldout"],
                    "inputs_sha1": report["inputs_sha1"], "n_tokens": report["n_tokens"],
                    "method": "token-level search (esr_core.resistance.token_detectors)"},
        "model": report["model"], "sae": sae_identity,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def layer_table(report: dict) -> list[dict]:
    """One row per layer: the group and its held-out numbers, and the baseline's where given."""
    rows = []
    for la in report["layers"]:
        h = la["heldout"]
        row = {"hook": la["hook"], "group": "searched", "size": len(la["members"]), "members": la["members"],
               "token_auc": h.get("token_auc_off_topic"), "token_auc_steered_drift": h.get("token_auc_steered_drift"),
               "garbled_auc": h.get("token_auc_garbled"), "unsteered_crossing": h.get("crossing_rate_unsteered"),
               "steered_drift_crossing": h.get("crossing_rate_steered_drift"),
               "garbled_crossing": max(h.get("crossing_rate_shuffled") or 0, h.get("crossing_rate_repeated") or 0),
               "ratio_off_topic": h.get("ratio_off_topic"), "ratio_after_correction": h.get("ratio_after_correction"),
               "threshold": la["threshold"], "passing_controls": la["n_passing"]}
        rows.append(row)
        b = la.get("baseline")
        if b:
            bh = b["heldout"]
            rows.append({**{k: None for k in row}, "hook": la["hook"], "group": b["name"], "size": len(b["members"]),
                         "members": b["members"], "token_auc": bh.get("token_auc_off_topic"),
                         "token_auc_steered_drift": bh.get("token_auc_steered_drift"),
                         "garbled_auc": bh.get("token_auc_garbled"),
                         "unsteered_crossing": bh.get("crossing_rate_unsteered"),
                         "steered_drift_crossing": bh.get("crossing_rate_steered_drift"),
                         "garbled_crossing": max(bh.get("crossing_rate_shuffled") or 0,
                                                 bh.get("crossing_rate_repeated") or 0),
                         "ratio_off_topic": bh.get("ratio_off_topic"),
                         "ratio_after_correction": bh.get("ratio_after_correction"), "threshold": b["threshold"]})
    return rows


def save_report(report: dict, path: str | Path) -> Path:
    """The full report (every candidate and control), written atomically."""
    atomic_write_json(Path(path), report)
    return Path(path)


EVIDENCE_ROWS = (  # (key in the held-out block, label, what a detector should show)
    ("token_auc_off_topic", "per-token AUC, off-topic vs on-topic (EMA signal)", "high"),
    ("token_auc_steered_drift", "per-token AUC, the model's own steered drift", "high"),
    ("token_auc_garbled", "per-token AUC, garbled vs clean on-topic (control)", "about 0.5"),
    ("crossing_rate_unsteered", "unsteered answers that cross the alert threshold", "<= 5 %"),
    ("crossing_rate_steered_drift", "steered drifts that cross", "high"),
    ("crossing_rate_recovery_drift", "off-topic spans of synthetic recoveries that cross", "high"),
    ("crossing_rate_shuffled", "shuffled on-topic answers that cross (control)", "low"),
    ("crossing_rate_repeated", "repetitive on-topic answers that cross (control)", "low"),
    ("ratio_off_topic", "off-topic span vs unsteered on-topic activity", "paper 4.4x"),
    ("ratio_after_correction", "after the correction vs unsteered on-topic", "paper 2.1x"),
    ("ratio_garbled", "garbled vs unsteered on-topic (control)", "about 1x"),
)


def evidence_rows(group_extra: dict) -> list[dict]:
    """The held-out evidence of a token-level group next to the previous circuit's, for the app."""
    ev = group_extra.get("evidence") or {}
    h = ev.get("heldout") or {}
    b = ((ev.get("baseline") or {}).get("heldout")) or {}
    bname = (ev.get("baseline") or {}).get("name", "previous circuit")
    rows = []
    for key, label, want in EVIDENCE_ROWS:
        if key not in h:
            continue
        rows.append({"measure (held-out prompts)": label, "this circuit": h.get(key),
                     bname: b.get(key) if b else None, "a detector should show": want})
    return rows
