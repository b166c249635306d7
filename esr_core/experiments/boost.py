"""Boost calibration: find the boost at which a latent drives the first-attempt score to a target.

ESR_METHOD.md sec. 4. Probabilistic bisection over a grid of boosts, a calibration cache
keyed by everything that changes the answer, and the boost-sweep levels derived from all
calibrated thresholds.

Reading of the paper's confidence rule (documented choice). Higher boost means a lower
score: the score is assumed to decrease with the boost. An observed mean score ``s``
(0-100) is turned into a Beta(0.5 + 5 s/100, 0.5 + 5 (1 - s/100)) belief about the true
score fraction (a Jeffreys prior plus five pseudo-observations), and
``P = BetaCDF(target/100)`` is the probability that the true score is *below* the target,
i.e. that the queried boost is *above* the threshold. When P >= 0.5 the observation says
"the threshold lies below the query": grid points below the query are multiplied by P and
the others by 1 - P. When P < 0.5 it is flipped: the indication is "above", with confidence
1 - P, and points above the query get 1 - P, the others P. Both cases are the same update;
the flip only makes the recorded confidence >= 0.5.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esr_core.errors import BadInput
from esr_core.experiments.stats import beta_cdf
from esr_core.io import atomic_write_json
from esr_core.paths import cache_subdir

PSEUDO_COUNT = 5.0  # weight of one observation in the Beta belief (paper: 5)


def observation_confidence(score: float, target: float = 30.0,
                           pseudo_count: float = PSEUDO_COUNT) -> tuple[bool, float]:
    """(below_target, confidence) for an observed score; confidence is in [0.5, 1].

    ``below_target`` True means the score is judged under the target, so the queried boost
    is above the threshold (see the module docstring for the reading of the rule).
    """
    s = min(max(float(score), 0.0), 100.0) / 100.0
    a = 0.5 + pseudo_count * s
    b = 0.5 + pseudo_count * (1.0 - s)
    p_below = beta_cdf(target / 100.0, a, b)
    return (True, p_below) if p_below >= 0.5 else (False, 1.0 - p_below)


@dataclass
class CalibrationStep:
    """One query of the bisection: where it looked, what it saw, what it concluded."""
    step: int
    boost: float
    score: float | None  # None when score_fn gave no usable score (step skipped)
    below_target: bool | None
    confidence: float | None
    median_after: float


@dataclass
class CalibrationResult:
    """Boost estimate (posterior median) with the history and a posterior summary."""
    boost: float
    target: float
    lo: float
    hi: float
    steps_done: int
    cancelled: bool
    posterior_mean: float
    posterior_sd: float
    ci90_lo: float
    ci90_hi: float
    history: list[CalibrationStep] = field(default_factory=list)
    grid: np.ndarray | None = field(default=None, repr=False)
    posterior: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the grid and posterior arrays are left out)."""
        d = asdict(self)
        d.pop("grid", None)
        d.pop("posterior", None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibrationResult:
        d = dict(d)
        d["history"] = [CalibrationStep(**h) for h in d.get("history", [])]
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def _quantile(grid: np.ndarray, post: np.ndarray, q: float) -> float:
    cdf = np.cumsum(post)
    i = int(np.searchsorted(cdf, q * cdf[-1]))
    return float(grid[min(i, grid.size - 1)])


def _summarise_posterior(grid: np.ndarray, post: np.ndarray) -> dict[str, float]:
    mean = float(np.sum(grid * post))
    sd = float(math.sqrt(max(np.sum((grid - mean) ** 2 * post), 0.0)))
    return {"boost": _quantile(grid, post, 0.5), "posterior_mean": mean, "posterior_sd": sd,
            "ci90_lo": _quantile(grid, post, 0.05), "ci90_hi": _quantile(grid, post, 0.95)}


def _accepts_rng(fn: Callable) -> bool:
    try:
        return "rng" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def probabilistic_bisection(score_fn: Callable[..., float | None], lo: float, hi: float,
                            target: float = 30.0, steps: int = 10, grid: int = 10_000,
                            prior_mean: float | None = None, prior_sd: float | None = None,
                            rng: np.random.Generator | int | None = None,
                            cancel: Callable[[], bool] | None = None,
                            on_step: Callable[[CalibrationStep], None] | None = None,
                            pseudo_count: float = PSEUDO_COUNT) -> CalibrationResult:
    """Estimate the boost where the (decreasing) score crosses ``target``.

    ``score_fn(boost)`` returns a mean first-attempt score in [0, 100] (it may average a few
    prompts); None or NaN skips the update for that step. When ``score_fn`` has an ``rng``
    keyword it receives ``rng`` (a numpy Generator) so that prompt choice is reproducible.
    Prior: Gaussian on the grid, mean (lo+hi)/2 and sd (hi-lo)/4 unless given. ``cancel()``
    is checked before every query; a cancelled run returns what it has (``cancelled=True``).
    ``on_step`` is called after each step (progress). Units of ``lo``/``hi`` are the
    caller's (raw boost or boost / median residual norm); the result is in the same units.
    """
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise BadInput(f"calibration range must satisfy lo < hi, got [{lo}, {hi}]")
    if not 0.0 < target < 100.0:
        raise BadInput(f"target score must be in (0, 100), got {target}")
    if steps < 0 or grid < 2:
        raise BadInput("need steps >= 0 and at least 2 grid points")
    mu = (lo + hi) / 2.0 if prior_mean is None else float(prior_mean)
    sd = (hi - lo) / 4.0 if prior_sd is None else float(prior_sd)
    if not sd > 0:
        raise BadInput(f"prior sd must be positive, got {sd}")
    if rng is None or isinstance(rng, (int, np.integer)):
        rng = np.random.default_rng(rng)
    pass_rng = _accepts_rng(score_fn)

    xs = np.linspace(lo, hi, int(grid))
    log_post = -0.5 * ((xs - mu) / sd) ** 2
    post = np.exp(log_post - log_post.max())
    post /= post.sum()

    history: list[CalibrationStep] = []
    cancelled = False
    for i in range(int(steps)):
        if cancel is not None and cancel():
            cancelled = True
            break
        query = _quantile(xs, post, 0.5)
        raw = score_fn(query, rng=rng) if pass_rng else score_fn(query)
        score = None
        try:
            if raw is not None and math.isfinite(float(raw)):
                score = float(raw)
        except (TypeError, ValueError):
            score = None
        below = conf = None
        if score is not None:
            below, conf = observation_confidence(score, target, pseudo_count)
            # weight for the side where the threshold is said to lie, and the other side
            left_w, right_w = (conf, 1.0 - conf) if below else (1.0 - conf, conf)
            post = np.where(xs < query, post * left_w, post * right_w)
            total = post.sum()
            if not total > 0:  # numerically impossible unless conf == 1; keep the old belief
                post = np.full_like(xs, 1.0 / xs.size)
            else:
                post /= total
        step = CalibrationStep(step=i + 1, boost=float(query), score=score, below_target=below,
                               confidence=None if conf is None else float(conf),
                               median_after=_quantile(xs, post, 0.5))
        history.append(step)
        if on_step is not None:
            on_step(step)

    summary = _summarise_posterior(xs, post)
    return CalibrationResult(target=float(target), lo=float(lo), hi=float(hi),
                             steps_done=len(history), cancelled=cancelled, history=history,
                             grid=xs, posterior=post, **summary)


# ---------------------------------------------------------------------------
# cache

@dataclass(frozen=True)
class CalibrationKey:
    """Everything that changes a calibrated threshold; never the latent alone."""
    model: str
    sae_key: str
    hook: str
    latent: int
    target: float
    judge_id: str

    def as_string(self) -> str:
        return json.dumps([self.model, self.sae_key, self.hook, int(self.latent),
                           float(self.target), self.judge_id])

    def file_name(self) -> str:
        return hashlib.sha256(self.as_string().encode("utf-8")).hexdigest()[:32] + ".json"


class CalibrationCache:
    """One JSON file per key in a directory; atomic writes, so readers never see half a file.

    Default directory: the user cache (``paths.cache_subdir("calibration")``).
    """

    def __init__(self, path: str | Path | None = None):
        if path is None:
            path = cache_subdir("calibration")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @staticmethod
    def key(model: str, sae_key: str, hook: str, latent: int, target: float,
            judge_id: str) -> CalibrationKey:
        return CalibrationKey(str(model), str(sae_key), str(hook), int(latent), float(target),
                              str(judge_id))

    def _file(self, key: CalibrationKey) -> Path:
        return self.path / key.file_name()

    def get(self, key: CalibrationKey) -> dict[str, Any] | None:
        """The stored value for ``key`` or None (also None for a corrupt or foreign file)."""
        f = self._file(key)
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if doc.get("key") != asdict(key):
            return None
        return doc.get("value")

    def put(self, key: CalibrationKey, value: dict[str, Any] | CalibrationResult) -> None:
        if isinstance(value, CalibrationResult):
            value = value.to_dict()
        with self._lock:
            atomic_write_json(self._file(key), {"key": asdict(key), "value": value})

    def entries(self) -> list[tuple[CalibrationKey, dict[str, Any]]]:
        """All stored (key, value) pairs, e.g. to build a boost sweep from every threshold."""
        out = []
        for f in sorted(self.path.glob("*.json")):
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
                out.append((CalibrationKey(**doc["key"]), doc["value"]))
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                continue
        return out


def import_run_calibrations(spec_doc: dict, cache: "CalibrationCache | None" = None) -> list[int]:
    """Copy the per-latent calibrations stored in an earlier run's spec into the cache.

    Why: a boost sweep (or a second run) over the same latents then reuses those thresholds
    instead of re-running the bisection; the runner still checks each value's settings and
    SAE hash before using it. Returns the latents imported.
    """
    cal = spec_doc.get("calibration") or {}
    need = ("model", "sae_key", "hook", "calib_target", "judge_id")
    missing = [k for k in need if not spec_doc.get(k)]
    if not cal:
        raise BadInput("That run stores no calibrations (it used fixed boosts or was never resolved)")
    if missing:
        raise BadInput(f"That run's spec lacks {', '.join(missing)}; cannot key its calibrations")
    cache = cache or CalibrationCache()
    done = []
    for lat, value in cal.items():
        if not isinstance(value, dict) or "boost_raw" not in value:
            continue
        key = cache.key(spec_doc["model"], spec_doc["sae_key"], spec_doc["hook"], int(lat),
                        float(spec_doc["calib_target"]), spec_doc["judge_id"])
        cache.put(key, value)
        done.append(int(lat))
    return done


# ---------------------------------------------------------------------------
# sweep levels

def _threshold_stats(thresholds: Iterable[float], fallback_rel_sd: float) -> tuple[float, float]:
    t = np.asarray([float(x) for x in thresholds if x is not None], dtype=float)
    t = t[np.isfinite(t)]
    if t.size == 0:
        raise BadInput("no calibrated thresholds to build a boost sweep from")
    mean = float(t.mean())
    sd = float(t.std(ddof=1)) if t.size > 1 else 0.0
    if not sd > 0:
        sd = abs(mean) * fallback_rel_sd
    if not sd > 0:
        raise BadInput("calibrated thresholds are all zero: no sweep possible")
    return mean, sd


def boost_sweep_levels(thresholds: Sequence[float], n_levels: int = 9, span_sd: float = 3.0,
                       floor_fraction: float = 0.02, fallback_rel_sd: float = 0.25) -> list[float]:
    """Evenly spaced boosts from mean - span_sd*sd to mean + span_sd*sd of the thresholds.

    The sd is the sample sd (ddof=1). A boost must stay positive: the lower end is clipped
    to ``floor_fraction * mean`` when mean - span_sd*sd would fall below it, keeping
    ``n_levels`` distinct levels. With a single threshold (no spread) the sd is taken as
    ``fallback_rel_sd * mean``.
    """
    if n_levels < 2:
        raise BadInput("a sweep needs at least 2 levels")
    mean, sd = _threshold_stats(thresholds, fallback_rel_sd)
    if mean <= 0:
        raise BadInput(f"mean calibrated threshold must be positive, got {mean:g}")
    lo = max(mean - span_sd * sd, floor_fraction * mean)
    hi = mean + span_sd * sd
    return [float(x) for x in np.linspace(lo, hi, int(n_levels))]


def levels_in_sd_units(levels: Sequence[float], thresholds: Sequence[float],
                       fallback_rel_sd: float = 0.25) -> list[float]:
    """Express boost levels as (level - mean threshold) / sd, the paper's sweep axis."""
    mean, sd = _threshold_stats(thresholds, fallback_rel_sd)
    return [(float(x) - mean) / sd for x in levels]
