"""The catalog's expensive pass: every held-out row through the model once, statistics per latent.

Per latent: density, max activation, a histogram of nonzero activations, the top
activating contexts (with per-token activations) and the tokens it fires on most (tf-idf
against corpus frequency). The pass is checkpointed about once a minute and a rerun with the
same SAE and inputs resumes it. ``residual_fn``/``encode_fn`` are plain callables, so the
pass also runs on a machine with only torch (no SAE-Lens), e.g. a lent GPU.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from esr_core.errors import BadInput
from esr_core.jobs import check_cancel, report_fraction
from esr_core.latents.catalog.store import (
    CTX_AFTER,
    CTX_BEFORE,
    FINE_HI,
    FINE_LO,
    FORMAT,
    N_FINE,
    N_HIST,
    N_TOP_TOKENS,
    WINDOW,
)
from esr_core.sae_training.corpus import pack_tokens

log = logging.getLogger(__name__)

CTX_LEN = CTX_BEFORE + 1 + CTX_AFTER
FINE_EDGES = np.logspace(FINE_LO, FINE_HI, N_FINE + 1)
MAX_CHAT_TOKENS = 384


def chat_item(item) -> tuple[list[dict], str] | None:
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
        parsed = chat_item(item)
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
    rows, tail = pack_tokens(texts, tokenizer, window, max_tokens, skip_blank=True)
    return rows + [tail] if len(tail) > 8 else rows


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
        if top["val"].shape[1] == 0:
            return
        rmax, rarg = z.max(dim=1)  # [B, d]
        merge_slots(top, "val", rmax, rarg, z, row_offsets)

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


def merge_slots(slots: dict, key: str, score, arg, z, row_offsets) -> None:
    """Keep, per latent, the ``k`` best of the old slots and this batch's one candidate per row.

    ``slots`` holds ``key`` [d, k] (the ranking score), ``pos`` [d, k] (flat position, -1 empty)
    and ``ctx`` [d, k, CTX_LEN] (the latent's activations around the position); ``score``/``arg``
    [B, d] (torch) are each row's candidate score and its token index in ``z`` [B, T, d].
    """
    import torch  # heavy: torch, only when a model runs

    k = slots[key].shape[1]
    cand = torch.cat([torch.from_numpy(slots[key]).float(), score.T.float().cpu()], dim=1)  # [d, k+B]
    new_val, sel = cand.topk(k, dim=1)
    sel, new_val = sel.numpy(), new_val.numpy()
    old_pos, old_ctx = slots["pos"], slots["ctx"]
    new_pos = np.full_like(old_pos, -1)
    new_ctx = np.zeros_like(old_ctx)
    li, si = np.nonzero(sel < k)
    new_pos[li, si] = old_pos[li, sel[li, si]]
    new_ctx[li, si] = old_ctx[li, sel[li, si]]
    li, si = np.nonzero((sel >= k) & (new_val > 0))
    if len(li):
        rows = sel[li, si] - k
        centre = arg.cpu().numpy()[rows, li]
        tt = centre[:, None] + np.arange(-CTX_BEFORE, CTX_AFTER + 1)[None, :]
        valid = (tt >= 0) & (tt < z.shape[1])
        ttc = np.clip(tt, 0, z.shape[1] - 1)
        g = z[torch.from_numpy(rows)[:, None], torch.from_numpy(ttc), torch.from_numpy(li)[:, None]]
        new_pos[li, si] = np.asarray(row_offsets)[rows] + centre
        new_ctx[li, si] = (g.cpu().numpy() * valid).astype(old_ctx.dtype)
    new_val[new_pos < 0] = 0
    slots[key], slots["pos"], slots["ctx"] = new_val.astype(slots[key].dtype), new_pos, new_ctx


def batch_tensors(rows: Rows, batch: np.ndarray, pad_id: int = 0):
    """(ids, attention mask, eligible-position mask) [B, T] for some rows, right padded."""
    import torch  # heavy: torch, only when a model runs

    lens = rows.lens
    T = int(lens[batch].max())
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), T), dtype=torch.long)
    elig = torch.zeros((len(batch), T), dtype=torch.bool)
    for j, r in enumerate(batch):
        L = int(lens[r])
        ids[j, :L] = torch.from_numpy(rows.flat[rows.row_starts[r] : rows.row_starts[r] + L])
        att[j, :L] = 1
        elig[j, int(rows.elig_start[r]) : L] = True
    return ids, att, elig


def row_batches(rows: Rows, batch_size: int) -> list[np.ndarray]:
    """Row indices in batches: text rows in order (so a checkpoint is a row count), chats by length."""
    lens = rows.lens
    out = []
    for kind in (0, 1):
        idx = np.nonzero(rows.row_kind == kind)[0]
        idx = idx[np.argsort(lens[idx], kind="stable")] if kind == 1 else idx
        for a in range(0, len(idx), batch_size):
            out.append(idx[a : a + batch_size])
    return out


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


def slots(d_sae: int, budget_bytes: int) -> tuple[int, int]:
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
    def load(cls, path) -> Rows:
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
    import torch  # heavy: torch, only when a model runs

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
                report_fraction(progress, "catalog", 0.0, f"resuming after {done_rows} rows")
        except Exception as exc:  # unreadable checkpoint: start over
            log.warning("ignoring unreadable checkpoint: %s", exc)
    batches = row_batches(rows, batch_size)
    last_ckpt = time.time()
    n_done = sum(len(b) for b in batches if b.max() < done_rows)
    for batch in batches:
        if batch.max() < done_rows:
            continue
        check_cancel(cancel, "Catalog build")
        ids, att, elig = batch_tensors(rows, batch, pad_id)
        with torch.no_grad():
            z = encode_fn(residual_fn(ids, att)).float().cpu()
        kind = "text" if rows.row_kind[batch[0]] == 0 else "chat"
        acc.update(z, ids, elig, rows.row_starts[batch], kind, vocab)
        n_done += len(batch)
        done_rows = max(done_rows, int(batch.max()) + 1) if kind == "text" else done_rows
        el = time.time() - t0
        report_fraction(progress, "catalog", 0.85 * n_done / n_rows,
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


