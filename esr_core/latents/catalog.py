"""Per-latent evidence for an SAE (Neuronpedia-style feature pages, computed offline).

One pass of the model (stopped at the SAE's hook) over held-out text and rendered chat
answers gives, per latent: density, max activation, a histogram of nonzero activations,
the top activating contexts (with per-token activations), the tokens it fires on most
(tf-idf against corpus frequency), the tokens its decoder direction promotes/suppresses
through the final norm and unembedding, its nearest latents by decoder cosine, a dead
flag and an offline description (:mod:`esr_core.latents.descriptions`).

Why this storage: the app opens the catalog at start, and the repo budget is small. The
evaluated token ids are stored once (uint16) and every context is just a position into
them plus uint8 per-token activations; scalars and labels are a small gzipped JSON.
Arrays load lazily from one compressed npz.

Position 0 of every row (the attention sink) is excluded from every statistic.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from esr_core.io import atomic_write_bytes
from esr_core.errors import BadInput, Cancelled, EsrError
from esr_core.paths import ASSETS_DIR, cache_subdir

log = logging.getLogger(__name__)

FORMAT = "esr-catalog-v1"
META_FILE = "catalog.json.gz"
ARRAYS_FILE = "arrays.npz"
OVERLAY_FILE = "neuronpedia_descriptions.json.gz"
SHIPPED_DIR = ASSETS_DIR / "catalog"

CTX_BEFORE = 12
CTX_AFTER = 4
CTX_LEN = CTX_BEFORE + 1 + CTX_AFTER
N_LOGIT = 10
N_NEIGHBOURS = 8
N_HIST = 24
N_TOP_TOKENS = 10
# fine log-spaced bins used while accumulating; each latent's 24 display bins are
# contiguous groups of these, spanning that latent's own range
FINE_LO, FINE_HI, N_FINE = -3.0, 4.0, 280
FINE_EDGES = np.logspace(FINE_LO, FINE_HI, N_FINE + 1)
WINDOW = 128
MAX_CHAT_TOKENS = 384
SOURCE_OFFLINE = "esr-lab offline labels"
SOURCE_NEURONPEDIA = "neuronpedia import"


class CatalogUnavailable(EsrError):
    """The catalog files are missing, corrupt or belong to another SAE."""


# ----------------------------------------------------------------------------- helpers


def sae_weights_hash(sae) -> str:
    """Content hash of the decoder (and its shape): survives git checkouts, unlike mtimes."""
    w = sae.W_dec.detach().float().cpu().contiguous().numpy()
    return hashlib.sha1(str(w.shape).encode() + w.tobytes()).hexdigest()[:16]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _check_cancel(cancel) -> None:
    if cancel is None:
        return
    hit = cancel() if callable(cancel) else cancel.is_set()
    if hit:
        raise Cancelled("Catalog build cancelled")


def _report(progress, frac: float, msg: str) -> None:
    if progress is not None:
        progress(float(min(max(frac, 0.0), 1.0)), msg)
    log.info("%3.0f%% %s", 100 * frac, msg)


class _StopAtHook(Exception):
    pass


def hook_residuals(model, hook_name: str, input_ids, attention_mask=None):
    """Residual stream at ``hook_name`` ([B, T, d]); the forward stops right there."""
    import torch

    hp = model.hook_point(hook_name)
    got = {}

    def hook(_mod, _inp, out):
        got["h"] = (out[0] if isinstance(out, (tuple, list)) else out).detach()
        raise _StopAtHook

    handle = hp.register_forward_hook(hook)
    try:
        with torch.no_grad():
            base = getattr(model.hf_model, "model", model.hf_model)
            try:
                base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopAtHook:
                pass
    finally:
        handle.remove()
    if "h" not in got:
        raise EsrError(f"Hook {hook_name} never fired on {model.name}")
    return got["h"]


def _final_norm_weight(hf_model):
    """Final norm's elementwise scale (Gemma's RMSNorm multiplies by 1 + weight)."""
    import torch

    base = getattr(hf_model, "model", hf_model)
    norm = getattr(base, "norm", None) or getattr(getattr(base, "language_model", None), "norm", None)
    if norm is None:
        return None
    inner = getattr(norm, "_original_component", norm)
    w = getattr(inner, "weight", None)
    if w is None:
        return None
    w = w.detach().float()
    if "gemma" in type(inner).__name__.lower():
        w = 1.0 + w
    return w.to(torch.float32)


# ----------------------------------------------------------------------------- inputs


def _chat_item(item) -> tuple[list[dict], str] | None:
    """Accept {"prompt","answer"}, {"messages": [...]}, a message list or (prompt, answer)."""
    if isinstance(item, dict):
        if "messages" in item:
            msgs = item["messages"]
        else:
            p = item.get("prompt") or item.get("user") or item.get("question")
            a = item.get("answer") or item.get("response") or item.get("completion") or item.get("text")
            if not p or not a:
                return None
            msgs = [{"role": "user", "content": str(p)}, {"role": "assistant", "content": str(a)}]
    elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
        msgs = [{"role": "user", "content": item[0]}, {"role": "assistant", "content": item[1]}]
    elif isinstance(item, list):
        msgs = item
    else:
        return None
    if not msgs or msgs[-1].get("role") != "assistant" or not str(msgs[-1].get("content", "")).strip():
        return None
    return msgs[:-1], str(msgs[-1]["content"])


def chat_rows(tokenizer, chat_texts: Iterable, max_tokens: int = MAX_CHAT_TOKENS) -> list[tuple[list[int], int]]:
    """(token ids, index of the first answer token) per conversation, via the chat template."""
    rows = []
    has_template = bool(getattr(tokenizer, "chat_template", None))
    for item in chat_texts or []:
        parsed = _chat_item(item)
        if parsed is None:
            continue
        head, answer = parsed
        if has_template:
            prefix = tokenizer.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(head + [{"role": "assistant", "content": answer}], tokenize=False)
        else:
            prefix = "".join(f"{m['role'].title()}: {m['content']}\n" for m in head) + "Assistant:"
            full = prefix + " " + answer
        pid = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        fid = tokenizer(full, add_special_tokens=False)["input_ids"]
        start = len(pid) if fid[: len(pid)] == pid else max(1, len(pid) - 1)
        if start >= len(fid):
            continue
        rows.append((fid[:max_tokens], start))
    return [r for r in rows if r[1] < len(r[0])]


def text_rows(tokenizer, texts: Sequence[str], max_tokens: int | None, window: int = WINDOW) -> list[list[int]]:
    """Texts packed (EOS-separated) into fixed windows, as the SAE trainer does, plus the tail."""
    from esr_core.sae_training.corpus import pack_tokens

    rows, tail = pack_tokens(texts, tokenizer, window, max_tokens, skip_blank=True)
    return rows + [tail] if len(tail) > 8 else rows


# ----------------------------------------------------------------------------- build


class _Accumulator:
    """Running statistics of one pass; its state can be saved and resumed."""

    def __init__(self, d_sae: int, k_text: int, k_chat: int):
        self.d = d_sae
        self.n_tokens = 0
        self.n_active = np.zeros(d_sae, np.int64)
        self.max_act = np.zeros(d_sae, np.float32)
        self.fine = np.zeros((d_sae, N_FINE), np.int64)
        self.tok_w: dict[int, float] = {}
        self.tops = {}
        for kind, k in (("text", k_text), ("chat", k_chat)):
            self.tops[kind] = {
                "val": np.zeros((d_sae, k), np.float32),
                "pos": np.full((d_sae, k), -1, np.int64),
                "ctx": np.zeros((d_sae, k, CTX_LEN), np.float16),
            }
        self._tw_keys: list[np.ndarray] = []
        self._tw_vals: list[np.ndarray] = []
        self.tw_keys = np.zeros(0, np.int64)
        self.tw_vals = np.zeros(0, np.float64)

    def _flush_token_weights(self) -> None:
        if not self._tw_keys:
            return
        keys = np.concatenate([self.tw_keys] + self._tw_keys)
        vals = np.concatenate([self.tw_vals] + self._tw_vals)
        uk, inv = np.unique(keys, return_inverse=True)
        self.tw_keys, self.tw_vals = uk, np.bincount(inv, weights=vals, minlength=len(uk))
        self._tw_keys, self._tw_vals = [], []

    def update(self, z, ids, mask, row_offsets, kind: str, vocab: int) -> None:
        """z [B,T,d] (torch), ids [B,T], mask [B,T] bool (eligible), row_offsets [B] flat starts."""
        import torch

        z = z * mask.unsqueeze(-1).to(z.dtype)
        self.n_tokens += int(mask.sum())
        pos_act = z > 0
        self.n_active += pos_act.sum((0, 1)).cpu().numpy().astype(np.int64)
        self.max_act = np.maximum(self.max_act, z.amax((0, 1)).cpu().numpy())
        b, t, l = pos_act.nonzero(as_tuple=True)
        vals = z[b, t, l].cpu().numpy().astype(np.float64)
        l_np = l.cpu().numpy().astype(np.int64)
        bins = np.clip(np.searchsorted(FINE_EDGES, vals, side="right") - 1, 0, N_FINE - 1)
        self.fine += np.bincount(l_np * N_FINE + bins, minlength=self.d * N_FINE).reshape(self.d, N_FINE)
        tok = ids[b, t].cpu().numpy().astype(np.int64)
        self._tw_keys.append(l_np * vocab + tok)
        self._tw_vals.append(vals)
        if sum(len(k) for k in self._tw_keys) > 4_000_000:
            self._flush_token_weights()
        # top contexts: at most one per row per latent (its best token in that row)
        top = self.tops[kind]
        k = top["val"].shape[1]
        if k == 0:
            return
        rmax, rarg = z.max(dim=1)  # [B, d]
        B = z.shape[0]
        cand_val = torch.cat([torch.from_numpy(top["val"]), rmax.T.float()], dim=1)  # [d, k+B]
        new_val, sel = cand_val.topk(k, dim=1)
        sel = sel.numpy()
        new_val = new_val.numpy()
        old_pos, old_ctx = top["pos"], top["ctx"]
        new_pos = np.full_like(old_pos, -1)
        new_ctx = np.zeros_like(old_ctx)
        from_old = sel < k
        li, si = np.nonzero(from_old)
        new_pos[li, si] = old_pos[li, sel[li, si]]
        new_ctx[li, si] = old_ctx[li, sel[li, si]]
        li, si = np.nonzero(~from_old & (new_val > 0))
        if len(li):
            rows = sel[li, si] - k
            rarg_np = rarg.cpu().numpy()
            centre = rarg_np[rows, li]
            offs = np.arange(-CTX_BEFORE, CTX_AFTER + 1)
            tt = centre[:, None] + offs[None, :]
            valid = (tt >= 0) & (tt < z.shape[1])
            ttc = np.clip(tt, 0, z.shape[1] - 1)
            g = z[torch.from_numpy(rows)[:, None], torch.from_numpy(ttc), torch.from_numpy(li)[:, None]]
            g = g.cpu().numpy() * valid
            new_pos[li, si] = np.asarray(row_offsets)[rows] + centre
            new_ctx[li, si] = g.astype(np.float16)
        new_val[new_pos < 0] = 0
        top["val"], top["pos"], top["ctx"] = new_val.astype(np.float32), new_pos, new_ctx
        del B

    def state(self) -> dict:
        self._flush_token_weights()
        out = {"n_tokens": np.array(self.n_tokens), "n_active": self.n_active, "max_act": self.max_act,
               "fine": self.fine, "tw_keys": self.tw_keys, "tw_vals": self.tw_vals}
        for kind, top in self.tops.items():
            for name, arr in top.items():
                out[f"{kind}_{name}"] = arr
        return out

    def restore(self, st) -> None:
        self.n_tokens = int(st["n_tokens"])
        self.n_active, self.max_act, self.fine = st["n_active"], st["max_act"], st["fine"]
        self.tw_keys, self.tw_vals = st["tw_keys"], st["tw_vals"]
        for kind, top in self.tops.items():
            for name in top:
                top[name] = st[f"{kind}_{name}"]


def _logit_effects(model, sae, progress=None):
    """Top promoted / suppressed tokens of each decoder direction through norm weight + W_U."""
    import torch

    W = sae.W_dec.detach().float().cpu()
    g = _final_norm_weight(model.hf_model)
    if g is not None:
        W = W * g.cpu()
    out_emb = model.hf_model.get_output_embeddings()
    inner = getattr(out_emb, "_original_component", out_emb)
    WU = inner.weight.detach().float().cpu()  # [V, d]
    d = W.shape[0]
    pi = np.zeros((d, N_LOGIT), np.int32)
    pv = np.zeros((d, N_LOGIT), np.float16)
    si = np.zeros((d, N_LOGIT), np.int32)
    sv = np.zeros((d, N_LOGIT), np.float16)
    with torch.no_grad():
        for a in range(0, d, 256):
            logits = W[a : a + 256] @ WU.T
            v, i = logits.topk(N_LOGIT, dim=1)
            pi[a : a + 256], pv[a : a + 256] = i.numpy(), v.numpy()
            v, i = (-logits).topk(N_LOGIT, dim=1)
            si[a : a + 256], sv[a : a + 256] = i.numpy(), (-v).numpy()
    return pi, pv, si, sv


def _neighbours(sae):
    import torch

    W = sae.W_dec.detach().float().cpu()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
    d = W.shape[0]
    k = min(N_NEIGHBOURS, d - 1)
    ni = np.zeros((d, k), np.int32)
    nv = np.zeros((d, k), np.float16)
    with torch.no_grad():
        for a in range(0, d, 1024):
            c = W[a : a + 1024] @ W.T
            c[torch.arange(c.shape[0]), torch.arange(a, a + c.shape[0])] = -2.0
            v, i = c.topk(k, dim=1)
            ni[a : a + 1024], nv[a : a + 1024] = i.numpy(), v.numpy()
    return ni, nv


def _coarse_hist(fine: np.ndarray):
    """Each latent's 24 log bins: contiguous groups of fine bins spanning its own range."""
    d = fine.shape[0]
    counts = np.zeros((d, N_HIST), np.uint32)
    lo = np.zeros(d, np.int16)
    step = np.ones(d, np.int16)
    for i in np.nonzero(fine.sum(1))[0]:
        nz = np.nonzero(fine[i])[0]
        a, b = int(nz[0]), int(nz[-1])
        s = max(1, math.ceil((b - a + 1) / N_HIST))
        seg = fine[i, a : a + s * N_HIST]
        seg = np.pad(seg, (0, s * N_HIST - len(seg)))
        counts[i] = seg.reshape(N_HIST, s).sum(1)
        lo[i], step[i] = a, s
    return counts, lo, step


def _top_tokens(acc: _Accumulator, token_freq: np.ndarray, vocab: int, n: int = N_TOP_TOKENS):
    """Per latent, tokens ranked by activation mass x idf (what it fires on, beyond 'the')."""
    acc._flush_token_weights()
    keys, vals = acc.tw_keys, acc.tw_vals
    lat = keys // vocab
    tok = keys % vocab
    total = max(1, int(token_freq.sum()))
    idf = np.log((total + 1) / (token_freq[tok] + 1.0))
    score = vals * idf
    d = acc.d
    ids = np.full((d, n), -1, np.int32)
    sc = np.zeros((d, n), np.float32)
    order = np.lexsort((-score, lat))
    lat_s = lat[order]
    starts = np.searchsorted(lat_s, np.arange(d))
    ends = np.searchsorted(lat_s, np.arange(d), side="right")
    for i in range(d):
        a, b = starts[i], min(ends[i], starts[i] + n)
        if b > a:
            o = order[a:b]
            ids[i, : b - a] = tok[o]
            sc[i, : b - a] = score[o]
    # normalise scores to the best token of each latent (display only)
    mx = sc.max(1, keepdims=True)
    sc = np.where(mx > 0, sc / np.maximum(mx, 1e-12), 0).astype(np.float16)
    return ids, sc


def _slots(d_sae: int, budget_bytes: int) -> tuple[int, int]:
    """How many held-out / chat contexts per latent fit the storage budget (~24 B each)."""
    per = max(4, int(budget_bytes * 0.55 / (d_sae * 24)))
    k_total = min(per, 24)
    k_chat = max(2, k_total // 4)
    return k_total - k_chat, k_chat


@dataclass
class Rows:
    """The evaluated tokens: rows back to back in one flat array."""

    flat: np.ndarray  # int64 token ids
    row_starts: np.ndarray  # int64 [R + 1]
    elig_start: np.ndarray  # int32 [R]: first position that counts (>= 1; answer start for chats)
    row_kind: np.ndarray  # uint8 [R]: 0 held-out text, 1 chat
    n_text: int
    n_chat: int

    @property
    def lens(self) -> np.ndarray:
        return np.diff(self.row_starts)

    def config_hash(self, sae_hash: str, k_text: int, k_chat: int) -> str:
        h = hashlib.sha1(f"{FORMAT}:{sae_hash}:{k_text}:{k_chat}:{WINDOW}".encode())
        for arr in (self.flat, self.row_starts, self.elig_start, self.row_kind):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def save(self, path) -> None:
        np.savez(path, flat=self.flat.astype(np.int32), row_starts=self.row_starts, elig_start=self.elig_start,
                 row_kind=self.row_kind, n=np.array([self.n_text, self.n_chat]))

    @classmethod
    def load(cls, path) -> "Rows":
        z = np.load(path)
        return cls(z["flat"].astype(np.int64), z["row_starts"], z["elig_start"], z["row_kind"],
                   int(z["n"][0]), int(z["n"][1]))


def prepare_rows(tokenizer, texts: Sequence[str], chat_texts: Iterable | None, max_tokens: int | None) -> Rows:
    rows = text_rows(tokenizer, list(texts or []), max_tokens)
    crows = chat_rows(tokenizer, chat_texts or [])
    if not rows and not crows:
        raise BadInput("No text to build a catalog from")
    all_rows = [(r, 1) for r in rows] + [(r, s) for r, s in crows]
    lens = np.array([len(r) for r, _ in all_rows], np.int64)
    return Rows(flat=np.concatenate([np.asarray(r, np.int64) for r, _ in all_rows]),
                row_starts=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                elig_start=np.array([max(1, s) for _, s in all_rows], np.int32),
                row_kind=np.array([0] * len(rows) + [1] * len(crows), np.uint8),
                n_text=len(rows), n_chat=len(crows))


def evidence_pass(rows: Rows, residual_fn, encode_fn, d_sae: int, vocab: int, k_text: int, k_chat: int,
                  cfg_hash: str = "", batch_size: int = 16, pad_id: int = 0, progress=None, cancel=None,
                  part_dir: Path | None = None) -> dict[str, np.ndarray]:
    """The expensive part: run every row, accumulate per-latent statistics.

    ``residual_fn(ids [B,T], attention_mask [B,T]) -> h [B,T,d]`` and ``encode_fn(h) -> z``
    are plain callables, so this also runs on a machine with only torch (no SAE-Lens).
    """
    import torch

    t0 = time.time()
    lens = rows.lens
    n_rows = len(lens)
    acc = _Accumulator(d_sae, k_text, k_chat)
    done_rows = 0
    if part_dir is not None and (part_dir / "state.npz").exists():
        try:
            st = np.load(part_dir / "state.npz")
            if str(st["cfg_hash"]) == cfg_hash:
                acc.restore(st)
                done_rows = int(st["done_rows"])
                _report(progress, 0.0, f"resuming after {done_rows} rows")
        except Exception as exc:  # unreadable checkpoint: start over
            log.warning("ignoring unreadable checkpoint: %s", exc)
    batches = []
    for kind in (0, 1):
        idx = np.nonzero(rows.row_kind == kind)[0]
        # similar lengths together: less padding for chats
        idx = idx[np.argsort(lens[idx], kind="stable")] if kind == 1 else idx
        for a in range(0, len(idx), batch_size):
            batches.append(idx[a : a + batch_size])
    last_ckpt = time.time()
    n_done = sum(len(b) for b in batches if b.max() < done_rows)
    for batch in batches:
        if batch.max() < done_rows:
            continue
        _check_cancel(cancel)
        T = int(lens[batch].max())
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        att = torch.zeros((len(batch), T), dtype=torch.long)
        elig = torch.zeros((len(batch), T), dtype=torch.bool)
        for j, r in enumerate(batch):
            L = int(lens[r])
            ids[j, :L] = torch.from_numpy(rows.flat[rows.row_starts[r] : rows.row_starts[r] + L])
            att[j, :L] = 1
            elig[j, int(rows.elig_start[r]) : L] = True
        with torch.no_grad():
            z = encode_fn(residual_fn(ids, att)).float().cpu()
        kind = "text" if rows.row_kind[batch[0]] == 0 else "chat"
        acc.update(z, ids, elig, rows.row_starts[batch], kind, vocab)
        n_done += len(batch)
        done_rows = max(done_rows, int(batch.max()) + 1) if kind == "text" else done_rows
        el = time.time() - t0
        _report(progress, 0.85 * n_done / n_rows,
                f"{n_done}/{n_rows} rows, {acc.n_tokens:,} tokens, {acc.n_tokens / max(el, 1e-6):.0f} tok/s")
        if part_dir is not None and kind == "text" and time.time() - last_ckpt > 60 and done_rows < rows.n_text:
            part_dir.mkdir(parents=True, exist_ok=True)
            st = acc.state()
            st.update(cfg_hash=np.array(cfg_hash), done_rows=np.array(done_rows))
            tmp = part_dir / "state.tmp.npz"
            np.savez(tmp, **st)
            os.replace(tmp, part_dir / "state.npz")
            last_ckpt = time.time()
    # summaries that need the whole pass
    elig_idx = np.concatenate([np.arange(rows.row_starts[r] + rows.elig_start[r], rows.row_starts[r + 1])
                               for r in range(n_rows)])
    token_freq = np.bincount(rows.flat[elig_idx], minlength=vocab).astype(np.float64)
    tt_ids, tt_sc = _top_tokens(acc, token_freq, vocab)
    counts, hlo, hstep = _coarse_hist(acc.fine)
    arrays: dict[str, np.ndarray] = {
        "density": (acc.n_active / max(1, acc.n_tokens)).astype(np.float32),
        "max_act": acc.max_act.astype(np.float32), "n_active": acc.n_active.astype(np.int64),
        "hist": counts, "hist_lo": hlo, "hist_step": hstep, "top_tok_ids": tt_ids, "top_tok_scores": tt_sc,
        "n_tokens": np.array(acc.n_tokens, np.int64), "pass_seconds": np.array(time.time() - t0),
    }
    mx = np.maximum(acc.max_act, 1e-12)[:, None, None]
    for kind, top in acc.tops.items():
        arrays[f"{kind}_pos"] = top["pos"].astype(np.int32)
        arrays[f"{kind}_val"] = top["val"].astype(np.float32)
        arrays[f"{kind}_ctx"] = np.clip(np.rint(top["ctx"].astype(np.float32) / mx * 255), 0, 255).astype(np.uint8)
    return arrays


def build_catalog(model, sae, texts: Sequence[str], chat_texts: Iterable | None, out_dir: str | Path,
                  progress: Callable[[float, str], None] | None = None, cancel=None,
                  max_tokens: int | None = None, batch_size: int = 16, budget_mb: float = 12.0,
                  command: str | None = None, describe: bool = True, sae_name: str | None = None,
                  corpus_note: str = "", rows: Rows | None = None, evidence: dict | None = None) -> Path:
    """Compute the catalog of ``sae`` on ``model`` over ``texts`` (+ chat answers) into ``out_dir``.

    ``progress(fraction, message)``; ``cancel`` an Event-like (``is_set``) or a callable.
    Resumable: a partial state is checkpointed in ``out_dir/.partial`` every ~60 s, and a
    rerun with the same SAE and inputs continues from it. ``rows``/``evidence`` let the
    pass run elsewhere (e.g. on a GPU machine with :func:`evidence_pass`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = model.tokenizer
    vocab = max(int(model.hf_model.config.vocab_size), len(tok))
    d = sae.d_sae
    t0 = time.time()
    _report(progress, 0.0, "tokenising")
    if rows is None:
        rows = prepare_rows(tok, texts, chat_texts, max_tokens)
    k_text, k_chat = _slots(d, int(budget_mb * 1e6))
    if rows.n_chat == 0:
        k_text, k_chat = k_text + k_chat, 0
    sae_hash = sae_weights_hash(sae)
    cfg_hash = rows.config_hash(sae_hash, k_text, k_chat)
    part_dir = out_dir / ".partial"
    external = evidence is not None
    if evidence is None:
        import torch

        device = next(model.hf_model.parameters()).device
        sae_dev = next(sae.sae.parameters()).device
        evidence = evidence_pass(
            rows, lambda ids, att: hook_residuals(model, sae.hook_name, ids.to(device), att.to(device)),
            lambda h: sae.encode(h.to(sae_dev)), d, vocab, k_text, k_chat, cfg_hash=cfg_hash,
            batch_size=batch_size, pad_id=tok.pad_token_id or 0, progress=progress, cancel=cancel,
            part_dir=part_dir)
        del torch
    arrays = dict(evidence)
    n_tokens = int(arrays.pop("n_tokens"))
    t_pass = float(arrays.pop("pass_seconds"))
    _report(progress, 0.86, "logit effects and neighbours")
    pi, pv, si, sv = _logit_effects(model, sae)
    ni, nv = _neighbours(sae)
    arrays.update({
        "tokens": rows.flat.astype(np.uint16 if vocab <= 65535 else np.int32),
        "row_starts": rows.row_starts.astype(np.int64), "row_kind": rows.row_kind, "elig_start": rows.elig_start,
        "promo_ids": pi, "promo_vals": pv, "supp_ids": si, "supp_vals": sv, "nn_ids": ni, "nn_cos": nv,
    })
    dead = arrays["n_active"] == 0
    tt_ids = arrays["top_tok_ids"]
    # strings for every token id the catalog can show, so loading needs no tokenizer
    used = np.unique(np.concatenate([rows.flat, pi.ravel(), si.ravel(), tt_ids[tt_ids >= 0].ravel()]))
    vocab_strings = {int(i): tok.decode([int(i)]) for i in used}
    meta = {
        "format": FORMAT, "model": model.name, "sae_name": sae_name or sae.source, "sae_key": sae.key,
        "sae_weights_hash": sae_hash, "hook_name": sae.hook_name, "d_sae": d, "d_in": sae.d_in,
        "n_tokens": n_tokens, "n_text_rows": rows.n_text, "n_chat_rows": rows.n_chat,
        "window": WINDOW, "ctx_before": CTX_BEFORE, "ctx_after": CTX_AFTER,
        "k_text": int(arrays["text_pos"].shape[1]), "k_chat": int(arrays["chat_pos"].shape[1]),
        "fine_edges": [FINE_LO, FINE_HI, N_FINE],
        "n_dead": int(dead.sum()), "build_seconds": None, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command, "corpus": corpus_note, "config_hash": cfg_hash,
        "position_0": "excluded (attention sink)",
    }
    latents = {"description": [""] * d, "topic": [""] * d, "topic_kind": [""] * d,
               "confidence": [0.0] * d, "low_confidence": [True] * d}
    # write the evidence first so descriptions can read it back through Catalog
    _write(out_dir, meta, latents, arrays, vocab_strings)
    if describe:
        from esr_core.latents.descriptions import describe_catalog

        t1 = time.time()
        _report(progress, 0.9, "writing descriptions")
        cat = Catalog.load(out_dir, overlay=False)
        latents, search = describe_catalog(cat, progress=lambda f, m: _report(progress, 0.9 + 0.09 * f, m),
                                           cancel=cancel)
        arrays.update(pack_search_vectors(search, budget_bytes=int(budget_mb * 1e6 / 3)))
        meta["describe_seconds"] = round(time.time() - t1, 1)
    meta["pass_seconds"] = round(t_pass, 1)
    meta["build_seconds"] = round(time.time() - t0 + (t_pass if external else 0.0), 1)
    meta["pass_machine"] = "external (see command)" if external else "local"
    _write(out_dir, meta, latents, arrays, vocab_strings)
    if part_dir.exists():
        shutil.rmtree(part_dir, ignore_errors=True)
    _report(progress, 1.0, f"catalog written to {out_dir} in {meta['build_seconds']:.0f} s")
    return out_dir


def _write(out_dir: Path, meta: dict, latents: dict, arrays: dict, vocab_strings: dict) -> None:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(out_dir / ARRAYS_FILE, buf.getvalue())
    doc = {"meta": meta, "latents": latents, "vocab": {str(k): v for k, v in vocab_strings.items()}}
    raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    atomic_write_bytes(out_dir / META_FILE, gzip.compress(raw, compresslevel=9, mtime=0))


def pack_search_vectors(vecs: np.ndarray, budget_bytes: int = 4_000_000) -> dict[str, np.ndarray]:
    """Label vectors for search as int8 rows (scaled per row), projected onto the top
    principal directions when 384 dims would not fit ``budget_bytes``."""
    d, k = vecs.shape
    arrs: dict[str, np.ndarray] = {}
    dims = min(k, max(32, budget_bytes // max(1, d)))
    if dims < k:
        _, _, vt = np.linalg.svd(vecs.astype(np.float64), full_matrices=False)
        P = vt[:dims].T.astype(np.float32)  # [k, dims], orthonormal columns
        vecs = vecs @ P
        arrs["search_proj"] = P
    scale = np.maximum(np.abs(vecs).max(1), 1e-8) / 127.0
    arrs["search_q"] = np.clip(np.rint(vecs / scale[:, None]), -127, 127).astype(np.int8)
    arrs["search_scale"] = scale.astype(np.float32)
    return arrs


def write_descriptions(path: str | Path, latents: dict, search: np.ndarray | None = None) -> None:
    """Replace the label columns (and label search vectors) of a catalog on disk."""
    path = Path(path)
    doc = _read_meta_doc(path)
    doc["latents"] = latents
    if search is not None:
        import io

        with np.load(path / ARRAYS_FILE) as z:
            arrays = {k: z[k] for k in z.files if not k.startswith("search_")}
        arrays.update(pack_search_vectors(search))
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(path / ARRAYS_FILE, buf.getvalue())
    raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    atomic_write_bytes(path / META_FILE, gzip.compress(raw, compresslevel=9, mtime=0))


# ----------------------------------------------------------------------------- load


def _read_meta_doc(path: Path) -> dict:
    f = path / META_FILE
    if not f.exists():
        raise CatalogUnavailable(f"No catalog at {path} ({META_FILE} is missing)")
    try:
        doc = json.loads(gzip.decompress(f.read_bytes()).decode("utf-8"))
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
        raise CatalogUnavailable(f"{f} is corrupt ({type(exc).__name__}); rebuild it with `esr-lab catalog build`") from None
    if not isinstance(doc, dict) or doc.get("meta", {}).get("format") != FORMAT:
        raise CatalogUnavailable(f"{f} is not an {FORMAT} catalog; rebuild it with `esr-lab catalog build`")
    return doc


def overlay_path(catalog_dir: Path, meta: dict) -> Path:
    """Where imported (Neuronpedia) descriptions live: beside a user catalog, or in the user
    cache for a shipped (repo) catalog so an import never edits tracked files."""
    catalog_dir = Path(catalog_dir).resolve()
    try:
        catalog_dir.relative_to(ASSETS_DIR.resolve())
        shipped = True
    except ValueError:
        shipped = False
    if shipped:
        return cache_subdir("catalogs", "overlays") / f"{_safe(meta.get('model', ''))}__{meta.get('sae_weights_hash', '')}.json.gz"
    return catalog_dir / OVERLAY_FILE


class Catalog:
    """A loaded catalog: scalars at once, evidence arrays lazily on first use."""

    def __init__(self, path: Path, doc: dict, npz, overlay: dict[int, str] | None = None):
        self.path = path
        self.meta: dict = doc["meta"]
        self._lat: dict = doc["latents"]
        self._vocab: dict[str, str] = doc.get("vocab", {})
        self._npz = npz
        self._arr: dict[str, np.ndarray] = {}
        self.d_sae = int(self.meta["d_sae"])
        self._desc = list(self._lat.get("description") or [""] * self.d_sae)
        if len(self._desc) != self.d_sae:
            raise CatalogUnavailable(f"{path} is corrupt: {len(self._desc)} descriptions for {self.d_sae} latents")
        self._desc_source = ["offline"] * self.d_sae
        self.n_imported = 0
        for i, text in (overlay or {}).items():
            if 0 <= i < self.d_sae:
                self._desc[i] = text
                self._desc_source[i] = "neuronpedia"
                self.n_imported += 1
        self.source = SOURCE_NEURONPEDIA if self.n_imported else SOURCE_OFFLINE
        self.density = self._a("density").astype(np.float32)
        self.max_act = self._a("max_act").astype(np.float32)
        if len(self.density) != self.d_sae or len(self.max_act) != self.d_sae:
            raise CatalogUnavailable(f"{path} is corrupt: arrays do not match {self.d_sae} latents")
        self.dead = self._a("n_active") == 0
        self._fp: str | None = None

    # -- loading
    @classmethod
    def load(cls, path: str | Path, overlay: bool = True) -> "Catalog":
        path = Path(path).expanduser()
        if not path.is_dir():
            raise CatalogUnavailable(f"No catalog folder at {path}")
        doc = _read_meta_doc(path)
        af = path / ARRAYS_FILE
        if not af.exists():
            raise CatalogUnavailable(f"{af} is missing; rebuild the catalog with `esr-lab catalog build`")
        try:
            npz = np.load(af, allow_pickle=False)
        except Exception as exc:
            raise CatalogUnavailable(f"{af} is corrupt ({type(exc).__name__}); rebuild the catalog") from None
        ov = {}
        if overlay:
            op = overlay_path(path, doc["meta"])
            if op.exists():
                try:
                    raw = json.loads(gzip.decompress(op.read_bytes()).decode("utf-8"))
                    ov = {int(k): str(v) for k, v in raw.get("descriptions", {}).items()}
                except Exception as exc:
                    raise CatalogUnavailable(f"Imported descriptions {op} are corrupt ({type(exc).__name__}); "
                                             f"re-import or delete that file") from None
        return cls(path, doc, npz, ov)

    def _a(self, name: str) -> np.ndarray:
        if name not in self._arr:
            try:
                self._arr[name] = self._npz[name]
            except KeyError:
                raise CatalogUnavailable(f"{self.path / ARRAYS_FILE} lacks '{name}'; rebuild the catalog") from None
            except Exception as exc:
                raise CatalogUnavailable(f"{self.path / ARRAYS_FILE} is corrupt ({type(exc).__name__}: "
                                         f"{str(exc)[:80]}); rebuild the catalog") from None
        return self._arr[name]

    # -- identity
    @property
    def fingerprint(self) -> str:
        """Changes whenever the SAE or any description changes (search caches key on it)."""
        if self._fp is None:
            h = hashlib.sha1(f"{self.meta.get('sae_weights_hash')}:{self.meta.get('config_hash')}".encode())
            h.update("\x00".join(self._desc).encode("utf-8"))
            self._fp = h.hexdigest()[:16]
        return self._fp

    def __len__(self) -> int:
        return self.d_sae

    def check_latent(self, latent) -> int:
        try:
            i = int(latent)
            if isinstance(latent, float) and latent != i:
                raise ValueError
        except (TypeError, ValueError):
            raise BadInput(f"Latent id must be an integer, got {latent!r}") from None
        if not 0 <= i < self.d_sae:
            raise BadInput(f"Latent {i} is not in this catalog: it has latents 0..{self.d_sae - 1}")
        return i

    # -- descriptions
    def description(self, latent) -> str:
        return self._desc[self.check_latent(latent)]

    def descriptions(self) -> list[str]:
        return list(self._desc)

    def description_source(self, latent) -> str:
        return self._desc_source[self.check_latent(latent)]

    def token_str(self, tid: int) -> str:
        return self._vocab.get(str(int(tid)), f"<{int(tid)}>")

    def top_tokens(self, latent, n: int = N_TOP_TOKENS) -> list[str]:
        i = self.check_latent(latent)
        ids = self._a("top_tok_ids")[i]
        return [self.token_str(t) for t in ids[:n] if t >= 0]

    def promoted_tokens(self, latent, n: int = N_LOGIT) -> list[str]:
        i = self.check_latent(latent)
        return [self.token_str(t) for t in self._a("promo_ids")[i][:n]]

    # -- evidence
    def contexts(self, latent, kind: str = "text") -> list[dict]:
        """Top activating contexts: tokens, per-token activations, index of the peak token."""
        i = self.check_latent(latent)
        if f"{kind}_pos" not in self._npz.files:
            return []
        pos = self._a(f"{kind}_pos")[i]
        vals = self._a(f"{kind}_val")[i]
        ctx = self._a(f"{kind}_ctx")[i]
        toks = self._a("tokens")
        starts = self._a("row_starts")
        elig = self._a("elig_start")
        mx = float(self.max_act[i])
        out = []
        for p, v, q in zip(pos, vals, ctx):
            if p < 0 or v <= 0:
                continue
            r = int(np.searchsorted(starts, p, side="right") - 1)
            a = max(int(starts[r]), int(p) - CTX_BEFORE)
            b = min(int(starts[r + 1]), int(p) + CTX_AFTER + 1)
            ids = toks[a:b].astype(np.int64)
            acts = q[a - (p - CTX_BEFORE) : b - (p - CTX_BEFORE)].astype(np.float32) / 255.0 * mx
            centre = int(p - a)
            acts[centre] = float(v)
            out.append({
                "tokens": [self.token_str(t) for t in ids], "token_ids": [int(t) for t in ids],
                "acts": [round(float(x), 4) for x in acts], "peak_index": centre, "max_act": float(v),
                "row": r, "position": int(p - starts[r]), "answer_start": int(elig[r]) if kind == "chat" else None,
            })
        return out

    def snippets(self, latent, kind: str = "text", n: int = 4, before: int = 8) -> list[str]:
        """Text just before and at the peak of the top ``n`` contexts (cheap; for labels)."""
        i = self.check_latent(latent)
        if f"{kind}_pos" not in self._npz.files:
            return []
        toks, starts = self._a("tokens"), self._a("row_starts")
        out = []
        for p in self._a(f"{kind}_pos")[i][:n]:
            if p < 0:
                continue
            r = int(np.searchsorted(starts, p, side="right") - 1)
            a = max(int(starts[r]), int(p) - before)
            out.append("".join(self.token_str(t) for t in toks[a : int(p) + 1]))
        return out

    def peak_words(self, latent, kind: str = "text", n: int = 12) -> list[tuple[str, float]]:
        """Whole words around the peaks of the top contexts ("bipartisan", not "isan"), with
        their summed peak activation, best first: labels read better than token pieces."""
        i = self.check_latent(latent)
        if f"{kind}_pos" not in self._npz.files:
            return []
        toks, starts = self._a("tokens"), self._a("row_starts")
        score: dict[str, float] = {}
        for p, v in zip(self._a(f"{kind}_pos")[i][:n], self._a(f"{kind}_val")[i][:n]):
            if p < 0:
                continue
            p = int(p)
            r = int(np.searchsorted(starts, p, side="right") - 1)
            a, b = int(starts[r]), int(starts[r + 1])
            s = self.token_str(toks[p])
            if not s.strip() or not s.strip()[0].isalnum():
                continue
            lo = p
            while lo > a + 1 and s[:1].isalnum() and self.token_str(toks[lo - 1])[-1:].isalnum():
                lo -= 1
                s = self.token_str(toks[lo])
            hi = p + 1
            while hi < b and self.token_str(toks[hi])[:1].isalnum():
                hi += 1
            w = "".join(self.token_str(t) for t in toks[lo:hi]).strip()
            if w:
                score[w] = score.get(w, 0.0) + float(v)
        return sorted(score.items(), key=lambda kv: -kv[1])

    def histogram(self, latent) -> dict:
        i = self.check_latent(latent)
        counts = self._a("hist")[i].astype(np.int64)
        lo, st = int(self._a("hist_lo")[i]), int(self._a("hist_step")[i])
        lo_e, hi_e, n_f = self.meta.get("fine_edges", [FINE_LO, FINE_HI, N_FINE])
        fine = np.logspace(lo_e, hi_e, int(n_f) + 1)
        idx = np.minimum(lo + st * np.arange(N_HIST + 1), len(fine) - 1)
        return {"edges": [float(x) for x in fine[idx]], "counts": [int(c) for c in counts]}

    def entry(self, latent) -> dict:
        """Everything known about one latent (a feature page)."""
        i = self.check_latent(latent)
        lat = self._lat

        def col(name, default=None):
            v = lat.get(name)
            return v[i] if v is not None and i < len(v) else default

        tt = self._a("top_tok_ids")[i]
        ts = self._a("top_tok_scores")[i]
        return {
            "latent": i,
            "description": self._desc[i],
            "description_source": self._desc_source[i],
            "topic": col("topic", ""), "topic_kind": col("topic_kind", ""),
            "confidence": col("confidence", 0.0), "low_confidence": bool(col("low_confidence", True)),
            "offline_description": col("description", ""),
            "density": float(self.density[i]), "max_act": float(self.max_act[i]),
            "n_active": int(self._a("n_active")[i]), "dead": bool(self.dead[i]),
            "histogram": self.histogram(i),
            "top_tokens": [{"token": self.token_str(t), "token_id": int(t), "score": float(s)}
                           for t, s in zip(tt, ts) if t >= 0],
            "promoted": [{"token": self.token_str(t), "token_id": int(t), "logit": float(v)}
                         for t, v in zip(self._a("promo_ids")[i], self._a("promo_vals")[i])],
            "suppressed": [{"token": self.token_str(t), "token_id": int(t), "logit": float(v)}
                           for t, v in zip(self._a("supp_ids")[i], self._a("supp_vals")[i])],
            "neighbours": [{"latent": int(j), "cosine": round(float(c), 4), "description": self._desc[int(j)]}
                           for j, c in zip(self._a("nn_ids")[i], self._a("nn_cos")[i])],
            "contexts": {"text": self.contexts(i, "text"), "chat": self.contexts(i, "chat")},
            "model": self.meta.get("model"), "sae": self.meta.get("sae_name"), "hook_name": self.meta.get("hook_name"),
            "source": self.source,
        }

    def search_vectors(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        """(unit rows [d, k], projection [384, k] or None) stored with the offline labels."""
        if "search_q" not in self._npz.files:
            return None
        v = self._a("search_q").astype(np.float32) * self._a("search_scale")[:, None]
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)
        proj = self._a("search_proj") if "search_proj" in self._npz.files else None
        return v, proj

    def info(self) -> dict:
        return {"path": str(self.path), "source": self.source, "n_imported": self.n_imported,
                "fingerprint": self.fingerprint, **{k: v for k, v in self.meta.items()}}


# ----------------------------------------------------------------------------- lookup


def _candidate_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    out = [root] if (root / META_FILE).exists() else []
    out += sorted(p for p in root.iterdir() if p.is_dir() and (p / META_FILE).exists())
    return out


def _meta_only(path: Path) -> dict | None:
    try:
        return _read_meta_doc(path)["meta"]
    except CatalogUnavailable:
        return None


def shipped_catalog_dir(model_name: str, sae) -> Path | None:
    """The shipped catalog for this exact SAE (matched by decoder hash), if any."""
    h = sae_weights_hash(sae)
    for p in _candidate_dirs(SHIPPED_DIR / _safe(model_name)):
        m = _meta_only(p)
        if m and m.get("sae_weights_hash") == h:
            return p
        if m:
            log.info("shipped catalog %s is for another SAE (%s != %s)", p, m.get("sae_weights_hash"), h)
    return None


def cached_catalog_dir(model_name: str, sae) -> Path:
    return cache_subdir("catalogs") / f"{_safe(model_name)}__{_safe(sae.key)}"


def find_catalog(model_name: str, sae) -> Path | None:
    """Shipped, else cached catalog for (model, SAE); None if it must be built."""
    p = shipped_catalog_dir(model_name, sae)
    if p is not None:
        return p
    c = cached_catalog_dir(model_name, sae)
    m = _meta_only(c) if (c / META_FILE).exists() else None
    if m and m.get("sae_weights_hash") == sae_weights_hash(sae) and (c / ARRAYS_FILE).exists():
        return c
    return None


SAMPLE_TEXTS = SHIPPED_DIR / "sample_texts.jsonl"


def default_corpus(model, n_tokens: int = 30_000) -> tuple[list[str], list, str]:
    """Held-out text (the corpus module's, else the shipped sample) and chat answers."""
    texts: list[str] = []
    chats: list = []
    note = ""
    try:
        from esr_core.sae_training.train import corpus

        docs, where = corpus.heldout_documents(model.name)
        plain = [d for d in corpus.interleave_by_source(docs) if "messages" not in d]
        chats = [d for d in docs if "messages" in d]
        total = 0
        for d in plain:
            texts.append(d["text"])
            total += len(d["text"]) / 4
            if total >= n_tokens:
                break
        note = f"{where}: ~{n_tokens:,} tokens of held-out text"
    except Exception as exc:  # corpus module missing or nothing fetched
        log.info("corpus unavailable (%s); using the shipped sample texts", exc)
    if not texts and SAMPLE_TEXTS.exists():
        for line in SAMPLE_TEXTS.read_text(encoding="utf-8").splitlines():
            if line.strip():
                d = json.loads(line)
                if "messages" in d:
                    chats.append(d)
                else:
                    texts.append(d["text"])
        note = f"shipped sample {SAMPLE_TEXTS.name}"
    answers = ASSETS_DIR / "prompts" / "default_answers.jsonl"
    if answers.exists():
        for line in answers.read_text(encoding="utf-8").splitlines():
            try:
                chats.append(json.loads(line))
            except ValueError:
                continue
        note += " + default answers"
    if not texts and not chats:
        raise CatalogUnavailable("No local text to build a catalog from (no corpus, no shipped sample)")
    return texts, chats, note


def catalog_for(model, sae, progress=None, cancel=None, n_tokens: int = 30_000) -> Catalog:
    """The catalog for (model, SAE): shipped, else cached, else built now into the user cache."""
    p = find_catalog(model.name, sae)
    if p is not None:
        return Catalog.load(p)
    out = cached_catalog_dir(model.name, sae)
    texts, chats, note = default_corpus(model, n_tokens)
    build_catalog(model, sae, texts, chats[:64], out, progress=progress, cancel=cancel, max_tokens=n_tokens,
                  command=f"catalog_for (on demand, {n_tokens} tokens)", corpus_note=note)
    return Catalog.load(out)


def load_catalog_for_names(model_name: str, sae) -> Catalog | None:
    """Catalog without loading the model, when one exists already."""
    p = find_catalog(model_name, sae)
    return Catalog.load(p) if p is not None else None
