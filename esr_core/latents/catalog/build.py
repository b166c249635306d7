"""Build a whole catalog for (model, SAE), or find the one that exists.

One evidence pass (:mod:`esr_core.latents.catalog.evidence`), then the tokens each decoder
direction promotes and suppresses through the final norm and unembedding, its nearest
latents by decoder cosine, and offline descriptions (:mod:`esr_core.latents.descriptions`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from esr_core.errors import BadInput
from esr_core.jobs import Progress, report_fraction
from esr_core.latents.catalog.bands import band_pass
from esr_core.latents.catalog.evidence import Rows, evidence_pass, prepare_rows, slots
from esr_core.latents.catalog.logit_effects import METHOD as LOGIT_METHOD
from esr_core.latents.catalog.logit_effects import causal_logit_effects
from esr_core.latents.catalog.store import (
    ARRAYS_FILE,
    BANDS,
    CTX_AFTER,
    CTX_BEFORE,
    FINE_HI,
    FINE_LO,
    FORMAT,
    N_FINE,
    N_LOGIT,
    N_NEIGHBOURS,
    SHIPPED_DIR,
    WINDOW,
    Catalog,
    CatalogUnavailable,
    cached_catalog_dir,
    find_catalog,
    pack_search_vectors,
    read_meta_doc,
    sae_weights_hash,
    write_files,
)
from esr_core.latents.descriptions import describe_catalog
from esr_core.models.hooks import capture
from esr_core.paths import ASSETS_DIR
from esr_core.sae_training import corpus

log = logging.getLogger(__name__)

SAMPLE_TEXTS = SHIPPED_DIR / "sample_texts.jsonl"


def _neighbours(sae):
    import torch  # heavy: torch, only when a model runs

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


def build_catalog(model, sae, texts: Sequence[str], chat_texts: Iterable | None, out_dir: str | Path,
                  progress: Progress | None = None, cancel=None,
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
    report_fraction(progress, "catalog", 0.0, "tokenising")
    if rows is None:
        rows = prepare_rows(tok, texts, chat_texts, max_tokens)
    k_text, k_chat = slots(d, int(budget_mb * 1e6))
    if rows.n_chat == 0:
        k_text, k_chat = k_text + k_chat, 0
    sae_hash = sae_weights_hash(sae)
    cfg_hash = rows.config_hash(sae_hash, k_text, k_chat)
    part_dir = out_dir / ".partial"
    external = evidence is not None
    residual_fn, encode_fn = _sae_fns(model, sae)
    if evidence is None:
        evidence = evidence_pass(
            rows, residual_fn, encode_fn, d, vocab, k_text, k_chat, cfg_hash=cfg_hash,
            batch_size=batch_size, pad_id=tok.pad_token_id or 0, progress=progress, cancel=cancel,
            part_dir=part_dir)
    arrays = dict(evidence)
    n_tokens = int(arrays.pop("n_tokens"))
    t_pass = float(arrays.pop("pass_seconds"))
    if "band_pos" not in arrays:
        report_fraction(progress, "catalog", 0.8, "samples from lower activation bands")
        arrays.update(band_pass(rows, residual_fn, encode_fn, arrays["max_act"], batch_size=batch_size,
                                pad_id=tok.pad_token_id or 0, cancel=cancel, part_file=part_dir / "bands.npz"))
    report_fraction(progress, "catalog", 0.86, "logit effects and neighbours")
    pi, pv, si, sv = causal_logit_effects(model, sae, arrays["max_act"], k=N_LOGIT, cancel=cancel)
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
        "position_0": "excluded (attention sink)", "logit_effects": LOGIT_METHOD,
        "bands": [list(b) for b in BANDS],
    }
    latents = {"description": [""] * d, "topic": [""] * d, "topic_kind": [""] * d,
               "confidence": [0.0] * d, "low_confidence": [True] * d}
    # write the evidence first so descriptions can read it back through Catalog
    write_files(out_dir, {"meta": meta, "latents": latents, "vocab": {str(k): v for k, v in vocab_strings.items()}}, arrays)
    if describe:
        t1 = time.time()
        report_fraction(progress, "catalog", 0.9, "writing descriptions")
        cat = Catalog.load(out_dir, overlay=False)
        latents, search = describe_catalog(
            cat, progress=lambda s: report_fraction(progress, "catalog", 0.9 + 0.09 * s.fraction, s.message),
            cancel=cancel)
        arrays.update(pack_search_vectors(search, budget_bytes=int(budget_mb * 1e6 / 3)))
        meta["describe_seconds"] = round(time.time() - t1, 1)
    meta["pass_seconds"] = round(t_pass, 1)
    meta["build_seconds"] = round(time.time() - t0 + (t_pass if external else 0.0), 1)
    meta["pass_machine"] = "external (see command)" if external else "local"
    write_files(out_dir, {"meta": meta, "latents": latents, "vocab": {str(k): v for k, v in vocab_strings.items()}}, arrays)
    if part_dir.exists():
        shutil.rmtree(part_dir, ignore_errors=True)
    report_fraction(progress, "catalog", 1.0, f"catalog written to {out_dir} in {meta['build_seconds']:.0f} s")
    return out_dir


def _sae_fns(model, sae):
    """(residual_fn, encode_fn) for the evidence passes: the SAE's hook on ``model``, then encode."""
    device = next(model.hf_model.parameters()).device
    sae_dev = next(sae.sae.parameters()).device

    def residual_fn(ids, att):
        return capture(model, sae.hook_name, ids.to(device), att.to(device))[sae.hook_name]

    return residual_fn, lambda h: sae.encode(h.to(sae_dev))


REFRESHABLE = ("logit-effects", "bands")


def refresh_catalog(path: str | Path, model, sae, what: Sequence[str] = REFRESHABLE,
                    progress: Progress | None = None, cancel=None) -> Path:
    """Recompute parts of a catalog in place: the promoted and suppressed tokens (the causal
    method) and/or the lower-band context samples (a second pass over the catalog's own rows).

    The evidence, labels and search vectors stay; the token strings new ids need are added.
    Checked against the SAE by decoder hash first; written atomically at the end.
    """
    unknown = [w for w in what if w not in REFRESHABLE]
    if unknown:
        raise BadInput(f"Unknown catalog part(s) {', '.join(unknown)}: choose from {', '.join(REFRESHABLE)}")
    path = Path(path)
    cat = Catalog.load(path, overlay=False)
    if cat.meta.get("sae_weights_hash") != sae_weights_hash(sae):
        raise CatalogUnavailable(f"{path} belongs to another SAE; rebuild it instead")
    doc = read_meta_doc(path)
    with np.load(path / ARRAYS_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    vocab = dict(doc.get("vocab", {}))
    if "logit-effects" in what:
        pi, pv, si, sv = causal_logit_effects(model, sae, cat.max_act, k=N_LOGIT, progress=progress, cancel=cancel)
        for t in np.unique(np.concatenate([pi.ravel(), si.ravel()])):
            vocab.setdefault(str(int(t)), model.tokenizer.decode([int(t)]))
        doc["meta"]["logit_effects"] = LOGIT_METHOD
        arrays.update(promo_ids=pi, promo_vals=pv, supp_ids=si, supp_vals=sv)
    if "bands" in what:
        rows = Rows(flat=arrays["tokens"].astype(np.int64), row_starts=arrays["row_starts"],
                    elig_start=arrays["elig_start"], row_kind=arrays["row_kind"],
                    n_text=int(doc["meta"].get("n_text_rows", 0)), n_chat=int(doc["meta"].get("n_chat_rows", 0)))
        residual_fn, encode_fn = _sae_fns(model, sae)
        part = cached_catalog_dir(model.name, sae) / "bands.partial.npz"  # a resumable pass, never in the repo
        arrays.update(band_pass(rows, residual_fn, encode_fn, cat.max_act, pad_id=model.tokenizer.pad_token_id or 0,
                                progress=progress, cancel=cancel, part_file=part))
        doc["meta"]["bands"] = [list(b) for b in BANDS]
    doc["vocab"] = vocab
    write_files(path, doc, arrays)
    return path


def default_corpus(model, n_tokens: int = 30_000) -> tuple[list[str], list, str]:
    """Held-out text (the corpus module's, else the shipped sample) and chat answers."""
    texts: list[str] = []
    chats: list = []
    note = ""
    try:
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


