"""ESR metrics: per-trial flags, Wilson intervals and per-condition summaries.

Definitions follow ESR_METHOD.md sec. 2. Everything is computed from a tidy trial table
(one row per trial) so that a summary can always be recomputed from the raw trials.

Trial table columns read here (others are carried along and ignored):
``attempts`` (list of ``{"attempt_text", "score", ...}`` or None when the trial was not
judged), ``n_attempts``, ``first_score``, ``last_score`` (used only when ``attempts`` is
absent), ``degraded`` (bool; recomputed from ``response`` when missing) and ``error``
(str or None).

Summary columns (one row per group; :data:`SUMMARY_COLUMNS` after the group keys):

* counts: ``n_trials``, ``n_valid``, ``n_dropped`` and the drop reasons
  ``n_dropped_error`` (generation or judge raised), ``n_dropped_not_judged`` (no judgement
  stored), ``n_dropped_no_attempts`` (judge found no scored attempt),
  ``n_dropped_degraded`` (only when ``drop_degraded=True``); ``n_degraded`` counts
  degraded outputs among all trials whether or not they are dropped.
* rates, each as ``<name>_k``, ``<name>_n``, ``<name>_rate``, ``<name>_lo``, ``<name>_hi``
  (Wilson 95 %): ``multi_attempt`` (#multi / #valid), ``esr`` (#improved / #valid),
  ``improvement`` (#improved / #multi), ``degraded`` (#degraded / #trials).
* means, each as ``<name>_mean``, ``<name>_sd``, ``<name>_n``, ``<name>_lo``, ``<name>_hi``
  (Student-t 95 %): ``score_improvement`` (last - first over multi-attempt trials),
  ``first_score`` (over valid trials), ``last_score`` (over valid trials).

A rate or mean with no data is NaN with NaN bounds: no data, no claim.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from esr_core.errors import BadInput
from esr_core.experiments.stats import mean_interval, newcombe_difference, wilson_interval

_WORD_STRIP = re.compile(r"[^\w]+", re.UNICODE)


def degraded_output(text: str | None, run_length: int = 5, min_word_len: int = 2) -> bool:
    """True when ``run_length`` identical consecutive words (each >= ``min_word_len`` chars) occur.

    Words are whitespace-separated, lower-cased, with punctuation removed. Tokens that are
    pure punctuation are skipped; a short word ("a", "I") breaks a run, as does any other word.
    This flags the gibberish that too strong a boost produces ("the the the the the").
    """
    if not text:
        return False
    run, prev = 0, None
    for raw in text.split():
        word = _WORD_STRIP.sub("", raw).replace("_", "").lower()
        if not word:
            continue
        if len(word) < min_word_len:
            run, prev = 0, None
            continue
        run = run + 1 if word == prev else 1
        prev = word
        if run >= run_length:
            return True
    return False


def _as_score(value: Any) -> float | None:
    try:
        s = float(value)
    except (TypeError, ValueError):
        return None
    return s if math.isfinite(s) else None


def scored_attempts(judgement: Mapping[str, Any] | Sequence[Any] | None) -> list[float] | None:
    """Scores of the judged attempts in order; None when there is no judgement at all.

    Accepts the judge output ``{"attempts": [...]}`` or the attempts list itself. Attempts
    without a finite numeric score are left out (a score is what makes an attempt count).
    """
    if judgement is None:
        return None
    if isinstance(judgement, Mapping):
        attempts = judgement.get("attempts")
        if attempts is None:
            return None
    else:
        attempts = judgement
    if isinstance(attempts, np.ndarray):
        attempts = attempts.tolist()
    scores = []
    for a in attempts:
        s = _as_score(a.get("score") if isinstance(a, Mapping) else a)
        if s is not None:
            scores.append(s)
    return scores


def _flags_from_scores(scores: list[float] | None) -> dict[str, Any]:
    if not scores:
        return {"valid": False, "n_attempts": 0 if scores is not None else None,
                "multi_attempt": False, "improved": False,
                "first_score": math.nan, "last_score": math.nan, "delta": math.nan}
    first, last = scores[0], scores[-1]
    multi = len(scores) > 1
    return {"valid": True, "n_attempts": len(scores), "multi_attempt": multi,
            "improved": bool(multi and last > first), "first_score": first,
            "last_score": last, "delta": (last - first) if multi else math.nan}


def trial_flags(judgement: Mapping[str, Any] | Sequence[Any] | None) -> dict[str, Any]:
    """Per-trial flags from a judgement: valid, multi_attempt, improved (= ESR), scores, delta.

    ``delta`` = last - first, defined (not NaN) only for multi-attempt trials, since a
    single attempt has nothing to improve on. ``improved`` is strict: last > first.
    """
    return _flags_from_scores(scored_attempts(judgement))


# ---------------------------------------------------------------------------
# intervals

RATE_NAMES = ("multi_attempt", "esr", "improvement", "degraded")
MEAN_NAMES = ("score_improvement", "first_score", "last_score")
COUNT_COLUMNS = ("n_trials", "n_valid", "n_dropped", "n_dropped_error", "n_dropped_not_judged",
                 "n_dropped_no_attempts", "n_dropped_degraded", "n_degraded")
SUMMARY_COLUMNS = (
    list(COUNT_COLUMNS)
    + [f"{r}_{s}" for r in RATE_NAMES for s in ("k", "n", "rate", "lo", "hi")]
    + [f"{m}_{s}" for m in MEAN_NAMES for s in ("mean", "sd", "n", "lo", "hi")]
)

DROP_REASONS = ("error", "not_judged", "no_attempts", "degraded")


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return False


def _row_scores(row: Mapping[str, Any], has_attempts: bool) -> list[float] | None:
    if has_attempts:
        att = row.get("attempts")
        if _is_missing(att):
            return None
        if isinstance(att, str):  # stored as JSON text in some files

            try:
                att = json.loads(att)
            except json.JSONDecodeError:
                return None
        return scored_attempts(att)
    # no attempts column: reconstruct from the summary columns the runner stores
    n = row.get("n_attempts")
    if _is_missing(n):
        return None
    n = int(n)
    if n <= 0:
        return []
    first, last = _as_score(row.get("first_score")), _as_score(row.get("last_score"))
    if first is None or last is None:
        return []
    return [first] if n == 1 else [first] + [math.nan] * (n - 2) + [last]


def trial_table_flags(trials: pd.DataFrame, drop_degraded: bool = False) -> pd.DataFrame:
    """The trial table with per-trial flags added.

    Adds ``degraded`` (when missing, from ``response``), ``valid``, ``drop_reason`` (one of
    :data:`DROP_REASONS` or None), ``multi_attempt``, ``improved``, ``first_score``,
    ``last_score``, ``delta`` and ``n_attempts`` (recomputed from ``attempts`` when present).
    Drop reasons are checked in the order error, not judged, no attempts, degraded.
    """
    df = trials.copy()
    if df.empty:
        for col, dtype in (("valid", bool), ("drop_reason", object), ("multi_attempt", bool),
                           ("improved", bool), ("first_score", float), ("last_score", float),
                           ("delta", float), ("n_attempts", float), ("degraded", bool)):
            if col not in df.columns:
                df[col] = pd.Series(dtype=dtype)
        return df
    has_attempts = "attempts" in df.columns
    if "degraded" in df.columns:
        degraded = df["degraded"].map(lambda v: bool(v) if not _is_missing(v) else False)
    elif "response" in df.columns:
        degraded = df["response"].map(lambda t: degraded_output(t) if isinstance(t, str) else False)
    else:
        degraded = pd.Series(False, index=df.index)
    df["degraded"] = degraded.astype(bool)

    records = []
    for idx, row in df.iterrows():
        err = row.get("error") if "error" in df.columns else None
        scores = _row_scores(row, has_attempts)
        if isinstance(scores, list) and any(math.isnan(s) for s in scores):
            # only first/last known: flags still follow from them
            flags = _flags_from_scores([scores[0], scores[-1]])
            flags["n_attempts"] = len(scores)
        else:
            flags = _flags_from_scores(scores)
        if not _is_missing(err) and str(err) != "":
            reason = "error"
        elif scores is None:
            reason = "not_judged"
        elif not flags["valid"]:
            reason = "no_attempts"
        elif drop_degraded and bool(df.at[idx, "degraded"]):
            reason = "degraded"
        else:
            reason = None
        flags["valid"] = reason is None
        flags["drop_reason"] = reason
        records.append(flags)
    flags_df = pd.DataFrame.from_records(records, index=df.index)
    for col in flags_df.columns:
        df[col] = flags_df[col]
    for col in ("valid", "multi_attempt", "improved"):
        df[col] = df[col].astype(bool)
    return df


def _rate_block(name: str, k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_interval(k, n)
    return {f"{name}_k": int(k), f"{name}_n": int(n),
            f"{name}_rate": (k / n) if n else math.nan, f"{name}_lo": lo, f"{name}_hi": hi}


def _mean_block(name: str, values: Iterable[float]) -> dict[str, Any]:
    m = mean_interval(values)
    return {f"{name}_{s}": m[s] for s in ("mean", "sd", "n", "lo", "hi")}


def summarise_flags(flagged: pd.DataFrame) -> dict[str, Any]:
    """All summary columns for one group of flagged trials (see module docstring)."""
    reasons = flagged["drop_reason"] if len(flagged) else pd.Series(dtype=object)
    valid = flagged[flagged["valid"]] if len(flagged) else flagged
    multi = valid[valid["multi_attempt"]] if len(valid) else valid
    n_valid, n_multi = len(valid), len(multi)
    n_improved = int(valid["improved"].sum()) if n_valid else 0
    out: dict[str, Any] = {
        "n_trials": len(flagged),
        "n_valid": n_valid,
        "n_dropped": len(flagged) - n_valid,
    }
    for r in DROP_REASONS:
        out[f"n_dropped_{r}"] = int((reasons == r).sum())
    n_degraded = int(flagged["degraded"].sum()) if len(flagged) else 0
    out["n_degraded"] = n_degraded
    out.update(_rate_block("multi_attempt", n_multi, n_valid))
    out.update(_rate_block("esr", n_improved, n_valid))
    out.update(_rate_block("improvement", n_improved, n_multi))
    out.update(_rate_block("degraded", n_degraded, len(flagged)))
    out.update(_mean_block("score_improvement", multi["delta"] if n_multi else []))
    out.update(_mean_block("first_score", valid["first_score"] if n_valid else []))
    out.update(_mean_block("last_score", valid["last_score"] if n_valid else []))
    return out


def summarise(trials: pd.DataFrame, by: Sequence[str] | str | None = ("condition",),
              drop_degraded: bool = False) -> pd.DataFrame:
    """Per-group ESR summary of a tidy trial table; columns = ``by`` + :data:`SUMMARY_COLUMNS`.

    ``by`` may be empty/None for one overall row. Groups with a missing key are kept (NaN key).
    Degraded outputs are kept and counted by default; ``drop_degraded=True`` excludes them
    from the valid trials and counts them under ``n_dropped_degraded``.
    """
    if isinstance(by, str):
        by = (by,)
    by = list(by or [])
    missing = [c for c in by if c not in trials.columns]
    if missing and len(trials):
        raise BadInput(f"trial table has no column(s) {missing} to group by")
    columns = by + list(SUMMARY_COLUMNS)
    if trials.empty:
        return pd.DataFrame(columns=columns)
    flagged = trial_table_flags(trials, drop_degraded=drop_degraded)
    rows = []
    if by:
        for key, group in flagged.groupby(by, dropna=False, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            row = dict(zip(by, key))
            row.update(summarise_flags(group))
            rows.append(row)
    else:
        rows.append(summarise_flags(flagged))
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------
# comparisons

def relative_change(rate: float, baseline_rate: float) -> float:
    """(rate - baseline) / baseline, e.g. 5.5 % vs 7.4 % -> -0.257; NaN when baseline is 0 or NaN."""
    try:
        rate, baseline_rate = float(rate), float(baseline_rate)
    except (TypeError, ValueError):
        return math.nan
    if not math.isfinite(rate) or not math.isfinite(baseline_rate) or baseline_rate == 0:
        return math.nan
    return rate / baseline_rate - 1.0


def rate_ratio(rate: float, baseline_rate: float) -> float:
    """rate / baseline (the paper's "4.3x"); NaN when baseline is 0 or NaN."""
    rc = relative_change(rate, baseline_rate)
    return rc + 1.0 if math.isfinite(rc) else math.nan


COMPARISON_COLUMNS = ["metric", "k", "n", "rate", "lo", "hi", "baseline", "baseline_k",
                      "baseline_n", "baseline_rate", "ratio", "relative_change", "diff",
                      "diff_lo", "diff_hi"]


def compare_to_baseline(summary: pd.DataFrame, baseline: str = "steering",
                        condition_col: str = "condition",
                        metrics: Sequence[str] = ("multi_attempt", "esr", "improvement")) -> pd.DataFrame:
    """Each condition against the baseline condition, one row per (other keys, condition, metric).

    Other group keys of the summary (e.g. ``boost_norm``) are matched exactly, so a
    condition is compared with the baseline at the same boost. Columns: the group keys
    then :data:`COMPARISON_COLUMNS`; ``diff`` = rate - baseline_rate with a Newcombe 95 %
    interval (``diff_lo``, ``diff_hi``), ``ratio`` and ``relative_change`` as in the paper
    (meta-prompt 4.3x, detector ablation -25 %). The baseline rows themselves are left out.
    """
    if condition_col not in summary.columns:
        raise BadInput(f"summary has no '{condition_col}' column")
    summary_cols = set(SUMMARY_COLUMNS)
    keys = [c for c in summary.columns if c not in summary_cols and c != condition_col]
    out_cols = keys + [condition_col] + COMPARISON_COLUMNS
    if summary.empty:
        return pd.DataFrame(columns=out_cols)
    base = summary[summary[condition_col] == baseline]
    if base.empty:
        raise BadInput(f"no baseline condition '{baseline}' in the summary "
                       f"(have: {sorted(map(str, summary[condition_col].unique()))})")

    def key_of(row: pd.Series) -> tuple:
        return tuple(row[k] for k in keys)

    base_by_key = {key_of(r): r for _, r in base.iterrows()}
    rows = []
    for _, r in summary.iterrows():
        if r[condition_col] == baseline:
            continue
        b = base_by_key.get(key_of(r))
        for m in metrics:
            k, n = int(r[f"{m}_k"]), int(r[f"{m}_n"])
            row = {kk: r[kk] for kk in keys}
            row.update({condition_col: r[condition_col], "metric": m, "k": k, "n": n,
                        "rate": r[f"{m}_rate"], "lo": r[f"{m}_lo"], "hi": r[f"{m}_hi"],
                        "baseline": baseline})
            if b is None:
                row.update({"baseline_k": math.nan, "baseline_n": math.nan,
                            "baseline_rate": math.nan, "ratio": math.nan,
                            "relative_change": math.nan, "diff": math.nan,
                            "diff_lo": math.nan, "diff_hi": math.nan})
            else:
                bk, bn = int(b[f"{m}_k"]), int(b[f"{m}_n"])
                d, dlo, dhi = newcombe_difference(k, n, bk, bn)
                row.update({"baseline_k": bk, "baseline_n": bn, "baseline_rate": b[f"{m}_rate"],
                            "ratio": rate_ratio(r[f"{m}_rate"], b[f"{m}_rate"]),
                            "relative_change": relative_change(r[f"{m}_rate"], b[f"{m}_rate"]),
                            "diff": d, "diff_lo": dlo, "diff_hi": dhi})
            rows.append(row)
    return pd.DataFrame(rows, columns=out_cols)


def pooled_rate(summary: pd.DataFrame, metric: str) -> dict[str, float]:
    """Pool one rate over several summary rows (sum of k and n) with its Wilson interval."""
    k = int(summary[f"{metric}_k"].sum()) if len(summary) else 0
    n = int(summary[f"{metric}_n"].sum()) if len(summary) else 0
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": (k / n) if n else math.nan, "lo": lo, "hi": hi}


def pool_by(summary: pd.DataFrame, by: str = "condition",
            metrics: Sequence[str] = ("multi_attempt", "esr", "improvement")) -> pd.DataFrame:
    """One row per ``by`` value: each rate pooled over the other groupings (e.g. per boost)."""
    if summary is None or not len(summary) or by not in summary.columns:
        return pd.DataFrame()
    rows = []
    for c, part in summary.groupby(by, sort=True):
        row = {by: str(c)}
        for metric in metrics:
            p = pooled_rate(part, metric)
            row.update({f"{metric}_{s}": p[s] for s in ("k", "n", "rate", "lo", "hi")})
        rows.append(row)
    return pd.DataFrame(rows)
