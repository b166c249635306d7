"""Interval statistics for ESR rates and means: Wilson, Student-t, Newcombe; the beta CDF.

The paper reports Wald intervals, which collapse to zero width at 0 %; ESR Lab reports Wilson
intervals for rates (ESR_METHOD.md sec. 2). scipy supplies the special functions when present;
a small self-contained fallback keeps the maths available without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from esr_core.errors import BadInput

# ---------------------------------------------------------------------------
# special functions (scipy when present; a small self-contained fallback otherwise)

try:  # scipy comes with transformers/sklearn; the fallback keeps this module standalone
    from scipy import special as _sp_special
except ImportError:  # pragma: no cover - exercised by forcing the fallback in tests
    _sp_special = None


def _betainc_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta (modified Lentz), valid for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc_fallback(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) without scipy (used when scipy is missing)."""
    if not (a > 0 and b > 0):
        raise BadInput(f"beta parameters must be positive, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betainc_cf(a, b, x) / a
    return 1.0 - front * _betainc_cf(b, a, 1.0 - x) / b


def beta_cdf(x: float, a: float, b: float) -> float:
    """CDF of Beta(a, b) at x."""
    if _sp_special is not None:
        return float(_sp_special.betainc(a, b, min(max(x, 0.0), 1.0)))
    return betainc_fallback(a, b, x)


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (for mean intervals).

    Inverts the CDF by bisection (no scipy.stats: it takes about a second to import, which
    every CLI call would pay); matches ``scipy.stats.t.ppf`` to 1e-6 (tests).
    """
    # invert the CDF, F(t) = 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t > 0
    if p == 0.5:
        return 0.0
    sign, q = (1.0, p) if p > 0.5 else (-1.0, 1.0 - p)

    def cdf(t: float) -> float:
        return 1.0 - 0.5 * betainc_fallback(df / 2.0, 0.5, df / (df + t * t))

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return sign * 0.5 * (lo + hi)


# ---------------------------------------------------------------------------
# trial level


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n.

    Unlike the Wald interval it does not collapse at 0 % or 100 %: k=0, n=10 gives
    (0, 0.2775). With n=0 there is no information and the result is (nan, nan), so that
    plots show no bar rather than a fake [0, 1] one.
    """
    if n < 0 or k < 0 or k > n:
        raise BadInput(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo, hi = centre - half, centre + half
    if k == 0:
        lo = 0.0
    if k == n:
        hi = 1.0
    return (max(0.0, lo), min(1.0, hi))


def mean_interval(values: Iterable[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sd, n and a Student-t interval; one value gives the mean with NaN bounds."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return {"mean": math.nan, "sd": math.nan, "n": 0, "lo": math.nan, "hi": math.nan}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "sd": math.nan, "n": 1, "lo": math.nan, "hi": math.nan}
    sd = float(x.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "lo": mean - half, "hi": mean + half}


def newcombe_difference(k1: int, n1: int, k2: int, n2: int, z: float = 1.96) -> tuple[float, float, float]:
    """Difference p1 - p2 with Newcombe's hybrid Wilson interval; NaN when either n is 0."""
    if n1 == 0 or n2 == 0:
        return (math.nan, math.nan, math.nan)
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return (d, lo, hi)


# ---------------------------------------------------------------------------
# table level
