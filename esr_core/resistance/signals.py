"""Statistics of latent signals: rank AUC, class statistics, Youden thresholds, EMA smoothing.

Pure numpy (scipy for ranks): the detector and backtracking searches, the per-token view and
the correction overlay all score and smooth latent activity with these same functions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from esr_core.errors import BadInput


def rank_auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Per-column AUC = P(pos > neg) + 0.5 P(pos == neg), by average ranks (Mann-Whitney U).

    ``pos`` [n_pos, d], ``neg`` [n_neg, d]; ties get half credit, so a latent that is zero
    everywhere scores exactly 0.5.
    """
    from scipy.stats import rankdata  # heavy: scipy.stats takes ~1 s to import

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
