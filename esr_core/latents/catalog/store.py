"""The catalog's on-disk format, the loaded :class:`Catalog`, and where catalogs are found.

Why this storage: the app opens the catalog at start, and the repo budget is small. The
evaluated token ids are stored once (uint16) and every context is just a position into
them plus uint8 per-token activations; scalars and labels are a small gzipped JSON.
Arrays load lazily from one compressed npz. Position 0 of every row (the attention sink)
is excluded from every statistic.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from esr_core.errors import BadInput, EsrError
from esr_core.io import atomic_write_bytes, safe_name
from esr_core.models.registry import get_entry
from esr_core.paths import ASSETS_DIR, cache_subdir

log = logging.getLogger(__name__)

FORMAT = "esr-catalog-v1"
META_FILE = "catalog.json.gz"
ARRAYS_FILE = "arrays.npz"
OVERLAY_FILE = "neuronpedia_descriptions.json.gz"
SHIPPED_DIR = ASSETS_DIR / "catalog"

CTX_BEFORE = 12
# lower activation bands sampled beside the top contexts, (low, high] share of the maximum
BANDS = ((0.5, 0.75), (0.25, 0.5), (0.0, 0.25))
CTX_AFTER = 4
N_LOGIT = 10
N_NEIGHBOURS = 8
N_HIST = 24
N_TOP_TOKENS = 10
# fine log-spaced bins used while accumulating; each latent's 24 display bins are
# contiguous groups of these, spanning that latent's own range
FINE_LO, FINE_HI, N_FINE = -3.0, 4.0, 280
WINDOW = 128
SOURCE_OFFLINE = "esr-lab offline labels"
SOURCE_NEURONPEDIA = "neuronpedia import"


class CatalogUnavailable(EsrError):
    """The catalog files are missing, corrupt or belong to another SAE."""


def sae_weights_hash(sae) -> str:
    """Content hash of the decoder (and its shape): survives git checkouts, unlike mtimes."""
    w = sae.W_dec.detach().float().cpu().contiguous().numpy()
    return hashlib.sha1(str(w.shape).encode() + w.tobytes()).hexdigest()[:16]


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


def write_files(path: str | Path, doc: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
    """Write a catalog's JSON document (and its arrays, when given) atomically."""
    path = Path(path)
    if arrays is not None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(path / ARRAYS_FILE, buf.getvalue())
    raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    atomic_write_bytes(path / META_FILE, gzip.compress(raw, compresslevel=9, mtime=0))


def band_label(band: int) -> str:
    lo, hi = BANDS[band]
    return f"{lo:.0%}–{hi:.0%} of max"


# ----------------------------------------------------------------------------- load


def read_meta_doc(path: Path) -> dict:
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
        return cache_subdir("catalogs", "overlays") / f"{safe_name(meta.get('model', ''))}__{meta.get('sae_weights_hash', '')}.json.gz"
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
        self.density = self.array("density").astype(np.float32)
        self.max_act = self.array("max_act").astype(np.float32)
        if len(self.density) != self.d_sae or len(self.max_act) != self.d_sae:
            raise CatalogUnavailable(f"{path} is corrupt: arrays do not match {self.d_sae} latents")
        self.dead = self.array("n_active") == 0
        self._fp: str | None = None

    # -- loading
    @classmethod
    def load(cls, path: str | Path, overlay: bool = True) -> "Catalog":
        path = Path(path).expanduser()
        if not path.is_dir():
            raise CatalogUnavailable(f"No catalog folder at {path}")
        doc = read_meta_doc(path)
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

    def array(self, name: str) -> np.ndarray:
        """One evidence array by name, loaded on first use."""
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
        ids = self.array("top_tok_ids")[i]
        return [self.token_str(t) for t in ids[:n] if t >= 0]

    # -- evidence
    def contexts(self, latent, kind: str = "text") -> list[dict]:
        """Top activating contexts: tokens, per-token activations, index of the peak token."""
        i = self.check_latent(latent)
        if f"{kind}_pos" not in self._npz.files:
            return []
        pos = self.array(f"{kind}_pos")[i]
        vals = self.array(f"{kind}_val")[i]
        ctx = self.array(f"{kind}_ctx")[i]
        return self._contexts(i, pos, vals, ctx, chat=kind == "chat")

    def band_contexts(self, latent) -> list[dict]:
        """Samples from lower activation bands (share of max), weakest band last; [] for a
        catalog built before bands existed (``esr-lab catalog refresh --what bands``)."""
        i = self.check_latent(latent)
        if "band_pos" not in self._npz.files:
            return []
        pos, ctx = self.array("band_pos")[i], self.array("band_ctx")[i]
        mx = float(self.max_act[i])
        out = []
        for b in range(min(len(BANDS), pos.shape[0])):
            vals = ctx[b, :, CTX_BEFORE].astype(np.float32) / 255.0 * mx
            out.append({"band": b, "label": band_label(b), "range": BANDS[b],
                        "contexts": self._contexts(i, pos[b], vals, ctx[b], chat=None)})
        return out

    def _contexts(self, i: int, pos, vals, ctx, chat: bool | None) -> list[dict]:
        toks = self.array("tokens")
        starts = self.array("row_starts")
        elig = self.array("elig_start")
        kinds = self.array("row_kind") if "row_kind" in self._npz.files else None
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
            is_chat = chat if chat is not None else bool(kinds is not None and kinds[r] == 1)
            out.append({
                "tokens": [self.token_str(t) for t in ids], "token_ids": [int(t) for t in ids],
                "acts": [round(float(x), 4) for x in acts], "peak_index": centre, "max_act": float(v),
                "row": r, "position": int(p - starts[r]), "answer_start": int(elig[r]) if is_chat else None,
            })
        return out

    def snippets(self, latent, kind: str = "text", n: int = 4, before: int = 8) -> list[str]:
        """Text just before and at the peak of the top ``n`` contexts (cheap; for labels)."""
        i = self.check_latent(latent)
        if f"{kind}_pos" not in self._npz.files:
            return []
        toks, starts = self.array("tokens"), self.array("row_starts")
        out = []
        for p in self.array(f"{kind}_pos")[i][:n]:
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
        toks, starts = self.array("tokens"), self.array("row_starts")
        score: dict[str, float] = {}
        for p, v in zip(self.array(f"{kind}_pos")[i][:n], self.array(f"{kind}_val")[i][:n]):
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
        counts = self.array("hist")[i].astype(np.int64)
        lo, st = int(self.array("hist_lo")[i]), int(self.array("hist_step")[i])
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

        tt = self.array("top_tok_ids")[i]
        ts = self.array("top_tok_scores")[i]
        return {
            "latent": i,
            "description": self._desc[i],
            "description_source": self._desc_source[i],
            "topic": col("topic", ""), "topic_kind": col("topic_kind", ""),
            "confidence": col("confidence", 0.0), "low_confidence": bool(col("low_confidence", True)),
            "offline_description": col("description", ""),
            "density": float(self.density[i]), "max_act": float(self.max_act[i]),
            "n_active": int(self.array("n_active")[i]), "dead": bool(self.dead[i]),
            "histogram": self.histogram(i),
            "top_tokens": [{"token": self.token_str(t), "token_id": int(t), "score": float(s)}
                           for t, s in zip(tt, ts) if t >= 0],
            "promoted": [{"token": self.token_str(t), "token_id": int(t), "logit": float(v)}
                         for t, v in zip(self.array("promo_ids")[i], self.array("promo_vals")[i])],
            "suppressed": [{"token": self.token_str(t), "token_id": int(t), "logit": float(v)}
                           for t, v in zip(self.array("supp_ids")[i], self.array("supp_vals")[i])],
            "neighbours": [{"latent": int(j), "cosine": round(float(c), 4), "description": self._desc[int(j)]}
                           for j, c in zip(self.array("nn_ids")[i], self.array("nn_cos")[i])],
            "contexts": {"text": self.contexts(i, "text"), "chat": self.contexts(i, "chat")},
            "bands": self.band_contexts(i),
            "model": self.meta.get("model"), "sae": self.meta.get("sae_name"), "hook_name": self.meta.get("hook_name"),
            "source": self.source,
        }

    def search_vectors(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        """(unit rows [d, k], projection [384, k] or None) stored with the offline labels."""
        if "search_q" not in self._npz.files:
            return None
        v = self.array("search_q").astype(np.float32) * self.array("search_scale")[:, None]
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)
        proj = self.array("search_proj") if "search_proj" in self._npz.files else None
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
        return read_meta_doc(path)["meta"]
    except CatalogUnavailable:
        return None


def shipped_catalog_dir(model_name: str, sae) -> Path | None:
    """The shipped catalog for this exact SAE (matched by decoder hash), if any."""
    h = sae_weights_hash(sae)
    for p in _candidate_dirs(SHIPPED_DIR / safe_name(model_name)):
        m = _meta_only(p)
        if m and m.get("sae_weights_hash") == h:
            return p
        if m:
            log.info("shipped catalog %s is for another SAE (%s != %s)", p, m.get("sae_weights_hash"), h)
    return None


def cached_catalog_dir(model_name: str, sae) -> Path:
    return cache_subdir("catalogs") / f"{safe_name(model_name)}__{safe_name(sae.key)}"


def catalog_model(model_name: str) -> str:
    """Whose catalog a model uses: an adapter model (a LoRA on a registry base) reads its base's,
    since it reads the base's SAE and its latents mean the same there (the SAE fit on the tuned
    model is measured and shown with it)."""
    e = get_entry(model_name)
    return e.base if e is not None and e.source == "adapter" and e.base else model_name


def find_catalog(model_name: str, sae) -> Path | None:
    """Shipped, else cached catalog for (model, SAE); None if it must be built."""
    model_name = catalog_model(model_name)
    p = shipped_catalog_dir(model_name, sae)
    if p is not None:
        return p
    c = cached_catalog_dir(model_name, sae)
    m = _meta_only(c) if (c / META_FILE).exists() else None
    if m and m.get("sae_weights_hash") == sae_weights_hash(sae) and (c / ARRAYS_FILE).exists():
        return c
    return None


def load_catalog_for_names(model_name: str, sae) -> Catalog | None:
    """Catalog without loading the model, when one exists already."""
    p = find_catalog(model_name, sae)
    return Catalog.load(p) if p is not None else None
