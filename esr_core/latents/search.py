"""Find latents: by meaning of their descriptions, and by what fires on a given text.

Search blends a semantic score (cosine between the query's embedding and each
description's embedding, all-MiniLM-L6-v2) with a lexical one (query words found in the
description and in the latent's top activating tokens), because short labels like
"cooking: bake, stir, whisk" are matched exactly by users who type "whisk", while
"recipes" needs the embedder. Description embeddings are computed once per catalog
fingerprint and cached in the user cache (``search/<fingerprint>.npy``), so a query
costs one short embedding plus a matrix-vector product.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from pathlib import Path

import numpy as np

from esr_core.errors import BadInput
from esr_core.io import atomic_write_bytes
from esr_core.latents.catalog.build import catalog_for
from esr_core.models.embeddings import embed, embedding_model
from esr_core.models.hooks import capture
from esr_core.paths import cache_subdir

log = logging.getLogger(__name__)

W_SEMANTIC = 1.0
W_DESC_WORD = 0.35  # per query word found in the description (as a fraction of query words)
W_TOKEN_WORD = 0.2  # per query word found among the top activating tokens
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_LOCK = threading.Lock()
_INDEX: dict[str, "_SearchIndex"] = {}


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class _SearchIndex:
    """Per-catalog: description embeddings and inverted word indexes (built once)."""
    def __init__(self, catalog, cache_root: Path | None = None):
        self.catalog = catalog
        self.d = catalog.d_sae
        root = cache_root or cache_subdir("search")
        self.emb_path = Path(root) / f"{catalog.fingerprint}.npy"
        self._emb: np.ndarray | None = None
        self.proj: np.ndarray | None = None
        self.desc_words: dict[str, list[int]] = {}
        self.tok_words: dict[str, list[int]] = {}
        descs = catalog.descriptions()
        for i, d in enumerate(descs):
            for w in set(_words(d)):
                self.desc_words.setdefault(w, []).append(i)
        ids = catalog.array("top_tok_ids")
        for i in range(self.d):
            ws = set()
            for t in ids[i]:
                if t >= 0:
                    ws.update(_words(catalog.token_str(t)))
            for w in ws:
                self.tok_words.setdefault(w, []).append(i)
        self.desc_words = {k: np.asarray(v, np.int64) for k, v in self.desc_words.items()}
        self.tok_words = {k: np.asarray(v, np.int64) for k, v in self.tok_words.items()}

    def embeddings(self) -> np.ndarray:
        """Unit description vectors [d, k] (k = 384, or fewer when the catalog is projected)."""
        if self._emb is not None:
            return self._emb
        stored = self.catalog.search_vectors()
        self.proj = stored[1] if stored is not None else None
        if stored is not None:
            # offline labels come with vectors; only imported descriptions need the embedder
            need = [i for i in range(self.d) if self.catalog.description_source(i) != "offline"]
        else:
            need = list(range(self.d))
        emb = stored[0].copy() if stored is not None else np.zeros((self.d, 384), np.float32)
        if need:
            got = None
            if self.emb_path.exists():
                try:
                    e = np.load(self.emb_path)
                    if e.shape[0] == len(need):
                        got = e.astype(np.float32)
                except (OSError, ValueError):
                    got = None
            if got is None:


                descs = self.catalog.descriptions()
                log.info("embedding %d latent descriptions (once per catalog)", len(need))
                got = embed([descs[i] for i in need], batch_size=128).astype(np.float16)
                buf = io.BytesIO()
                np.save(buf, got)
                atomic_write_bytes(self.emb_path, buf.getvalue())
                got = got.astype(np.float32)
            if self.proj is not None:
                got = got @ self.proj
                got /= np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-8)
            emb[need] = got
        self._emb = np.ascontiguousarray(emb, dtype=np.float32)
        return self._emb

    def query_vector(self, query: str) -> np.ndarray:
        self.embeddings()
        q = embed_query(query)
        if self.proj is not None:
            q = q @ self.proj
            q = q / max(float(np.linalg.norm(q)), 1e-8)
        return q


_QLOCK = threading.Lock()
_QCACHE: dict[str, np.ndarray] = {}


def embed_query(text: str) -> np.ndarray:
    """One short query's embedding, fast: a direct mean-pooled forward on one thread.

    Why: sentence-transformers' ``encode`` with the default thread pool spends ~1 s per
    short query on a busy 2-core machine (threads thrash); one thread takes ~20 ms of CPU.
    Equal to :func:`esr_core.models.embeddings.embed` (same model, mean pooling, unit norm).
    """
    with _QLOCK:
        if text in _QCACHE:
            return _QCACHE[text]
        import torch  # heavy: torch


        m = embedding_model()
        try:
            tok, bert = m.tokenizer, m[0].auto_model
        except (AttributeError, IndexError, TypeError):
            v = embed([text])[0]
        else:
            prev = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with torch.inference_mode():
                    enc = tok([text], return_tensors="pt", truncation=True, max_length=256)
                    out = bert(**enc).last_hidden_state
                    mask = enc["attention_mask"][..., None].to(out.dtype)
                    v = (out * mask).sum(1) / mask.sum(1)
                    v = torch.nn.functional.normalize(v, dim=-1)[0].float().numpy()
            finally:
                torch.set_num_threads(prev)
        if len(_QCACHE) > 512:
            _QCACHE.clear()
        _QCACHE[text] = v.astype(np.float32)
        return _QCACHE[text]


def search_index(catalog) -> _SearchIndex:
    key = f"{id(catalog)}:{catalog.fingerprint}"
    with _LOCK:
        idx = _INDEX.get(key)
        if idx is None:
            idx = _SearchIndex(catalog)
            _INDEX[key] = idx
        return idx


def warm_search(catalog) -> None:
    """Compute (or load) the description embeddings now, e.g. right after a build."""
    search_index(catalog).embeddings()


def _positive_top(top) -> int:
    """``top`` as a positive int, or a clear BadInput (it often comes from a text box)."""
    try:
        top = int(top)
    except (TypeError, ValueError):
        raise BadInput(f"top must be an integer, got {top!r}") from None
    if top <= 0:
        raise BadInput("top must be positive")
    return top


def search_latents(catalog, query: str, top: int = 20, min_density: float | None = None,
                   max_density: float | None = None, include_dead: bool = False) -> list[dict]:
    """Latents whose descriptions best match ``query`` (semantic + lexical), best first."""
    if query is None or not str(query).strip():
        raise BadInput("The search query is empty")
    top = _positive_top(top)
    for name, v in (("min_density", min_density), ("max_density", max_density)):
        if v is not None and not (0.0 <= float(v) <= 1.0):
            raise BadInput(f"{name} must be between 0 and 1, got {v}")
    idx = search_index(catalog)
    emb = idx.embeddings()
    q = idx.query_vector(str(query).strip())
    score = emb @ q * W_SEMANTIC
    qw = list(dict.fromkeys(_words(query)))
    if qw:
        lex = np.zeros(idx.d, np.float32)
        tokm = np.zeros(idx.d, np.float32)
        for w in qw:
            hit = idx.desc_words.get(w)
            if hit is not None:
                lex[hit] += 1.0
            hit = idx.tok_words.get(w)
            if hit is not None:
                tokm[hit] += 1.0
        score = score + W_DESC_WORD * lex / len(qw) + W_TOKEN_WORD * tokm / len(qw)
    ok = np.ones(idx.d, bool)
    if not include_dead:
        ok &= ~catalog.dead
    if min_density is not None:
        ok &= catalog.density >= float(min_density)
    if max_density is not None:
        ok &= catalog.density <= float(max_density)
    score = np.where(ok, score, -np.inf)
    k = min(top, int(ok.sum()))
    if k == 0:
        return []
    cand = np.argpartition(-score, k - 1)[:k]
    cand = cand[np.argsort(-score[cand], kind="stable")]
    descs = catalog.descriptions()
    return [{"latent": int(i), "description": descs[i], "score": round(float(score[i]), 4),
             "density": float(catalog.density[i]), "max_act": float(catalog.max_act[i])} for i in cand]


def _acts_for_text(engine_or_model_sae, text: str):
    """(token strings, z [T, d_sae] numpy) for ``text``; engine if given, else a direct hook."""
    if hasattr(engine_or_model_sae, "activations"):
        r = engine_or_model_sae.activations(text=text)
        z = r.z.float().cpu().numpy() if hasattr(r.z, "cpu") else np.asarray(r.z, np.float32)
        return list(r.tokens), z
    model, sae = engine_or_model_sae
    import torch  # heavy: torch, only when a model runs

    tok = model.tokenizer
    ids = tok(text, add_special_tokens=True)["input_ids"]
    h = capture(model, sae.hook_name, torch.tensor([ids]))[sae.hook_name]
    with torch.no_grad():
        z = sae.encode(h)[0].float().cpu().numpy()
    return [tok.decode([t]) for t in ids], z


def latents_firing_on(engine_or_model_sae, text: str, top: int = 20, catalog=None) -> list[dict]:
    """Latents most active on ``text``, ranked by activation relative to their catalog maximum.

    ``engine_or_model_sae``: an engine with ``.activations(text=...)`` (and ``.model``/``.sae``)
    or a ``(LoadedModel, SaeHandle)`` pair. Position 0 (attention sink) is ignored.
    """
    if text is None or not str(text).strip():
        raise BadInput("The text is empty")
    top = _positive_top(top)
    if catalog is None:
        if hasattr(engine_or_model_sae, "activations"):
            catalog = catalog_for(engine_or_model_sae.model, engine_or_model_sae.sae)
        else:
            catalog = catalog_for(*engine_or_model_sae)
    tokens, z = _acts_for_text(engine_or_model_sae, str(text))
    if z.shape[1] != catalog.d_sae:
        raise BadInput(f"The catalog has {catalog.d_sae} latents but the SAE has {z.shape[1]}")
    if z.shape[0] < 2:
        return []
    z = z[1:]
    mx = z.max(0)
    arg = z.argmax(0) + 1
    ref = np.where(catalog.max_act > 0, catalog.max_act, np.inf)
    rel = np.where(mx > 0, mx / ref, 0.0)
    rel = np.where(np.isfinite(ref), rel, np.where(mx > 0, 1.0, 0.0))  # never seen active: treat as 100 %
    live = np.nonzero(mx > 0)[0]
    if len(live) == 0:
        return []
    order = live[np.lexsort((-mx[live], -rel[live]))][:top]
    descs = catalog.descriptions()
    return [{"latent": int(i), "description": descs[i], "max_act_on_text": round(float(mx[i]), 4),
             "relative": round(float(rel[i]), 4), "token_index": int(arg[i]), "token": tokens[int(arg[i])]}
            for i in order]
