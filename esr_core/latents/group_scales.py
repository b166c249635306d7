"""Several latents on one colour scale: each member divided by its own scale, then summed.

Why: latents live on very different raw scales (one peaks at 3, another at 60), so a group's
heatmap or lane normalises each member by its own catalog maximum, falling back to the
maximum seen in the runs shown; the legend says which scale each member used.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from esr_core.errors import BadInput

SCALE_SOURCES = {"catalog": "its catalog max", "observed": "its max in these runs", "none": "never active: 0"}


def _positive(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def catalog_scales(catalog, members: Sequence[int]) -> list[float | None]:
    """Each member's max activation in ``catalog`` (its ``max_act`` array), None where it has none.

    None for every member when there is no catalog (e.g. a non-default SAE), and for a latent
    outside the catalog or one never active in it (max 0)."""
    mx = getattr(catalog, "max_act", None) if catalog is not None else None
    if mx is None:
        return [None] * len(members)
    out: list[float | None] = []
    for m in members:
        m = int(m)
        out.append(_positive(mx[m]) if 0 <= m < len(mx) else None)
    return out


def observed_scales(member_acts, mask: Sequence[bool] | None = None) -> np.ndarray:
    """Per-member max |activation| over the rows where ``mask`` is true (all rows if None); NaN reads 0."""
    a = np.asarray(member_acts, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    a = np.where(np.isfinite(a), np.abs(a), 0.0)
    if mask is not None:
        keep = np.asarray(list(mask), dtype=bool)[: a.shape[0]]
        keep = np.concatenate([keep, np.ones(a.shape[0] - len(keep), dtype=bool)])
        a = a[keep]
    return a.max(axis=0) if a.shape[0] else np.zeros(a.shape[1])


def resolve_scales(scales: Sequence[float | None] | None, fallback: Sequence[float] | None,
                   n: int) -> tuple[np.ndarray, list[str]]:
    """One scale per member and where it came from: ``"catalog"`` (``scales``), ``"observed"``
    (``fallback``: the max seen in the run) or ``"none"`` (never active anywhere: contributes 0)."""
    own = list(scales) if scales is not None else [None] * n
    fb = list(fallback) if fallback is not None else [None] * n
    out, src = np.zeros(n), []
    for k in range(n):
        s = _positive(own[k]) if k < len(own) else None
        if s is not None:
            out[k] = s
            src.append("catalog")
            continue
        f = _positive(fb[k]) if k < len(fb) else None
        out[k] = f or 0.0
        src.append("observed" if f is not None else "none")
    return out, src


def normalised_lane(member_acts, weights: Sequence[float], scales: Sequence[float | None] | None = None,
                    fallback: Sequence[float] | None = None, how: str = "sum") -> np.ndarray:
    """Weighted sum over members of ``activation / that member's own scale``, per token.

    ``member_acts`` [T, n_members]; ``scales`` each member's own scale (catalog max or a high
    quantile; None/NaN/<=0 = unknown); an unknown scale falls back to ``fallback`` (e.g. the max
    observed in the runs shown), else to the max |activation| of that member in ``member_acts``.
    So a latent at its own peak contributes its weight whatever its raw units: two latents with
    scales 10 and 1 contribute equally at 10 and 1. NaN activations read 0; ``how="mean"``
    divides by the sum of |weights|.
    """
    a = np.asarray(member_acts, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    n = a.shape[1]
    w = np.asarray(list(weights), dtype=float)
    if w.shape != (n,):
        raise BadInput(f"{n} member columns but {w.size} weights")
    a = np.where(np.isfinite(a), a, 0.0)
    seen = observed_scales(a)
    given = list(fallback) if fallback is not None else []
    fb = [(given[k] if k < len(given) and _positive(given[k]) else seen[k]) for k in range(n)]
    s, _ = resolve_scales(scales, fb, n)
    safe = np.where(s > 0, s, 1.0)
    total = (a / safe * np.where(s > 0, 1.0, 0.0)) @ w if n else np.zeros(a.shape[0])
    if how == "mean":
        total = total / max(float(np.sum(np.abs(w))), 1e-12)
    return total
