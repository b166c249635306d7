"""Readable views of an experiment summary (tables, notes), shared by the Experiments page and
`esr-lab experiment summary`, so both always say the same thing about a run."""

from __future__ import annotations

import math

import pandas as pd


def pct(x, width: int = 0) -> str:
    """A rate as a percentage with one decimal, or n/a for missing / non-finite values."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a".rjust(width)
    return ("n/a" if not math.isfinite(x) else f"{100 * x:.1f} %").rjust(width)


def rates_table(summary: dict) -> pd.DataFrame:
    """One row per condition: counts, rates with Wilson 95 % intervals, mean first score."""
    rows = []
    for r in summary.get("by_condition", []):
        rows.append({
            "condition": r["condition"], "trials": r["n_trials"], "valid": r["n_valid"],
            "multi-attempt": f"{r['multi_attempt_k']}/{r['multi_attempt_n']} = {pct(r['multi_attempt_rate'])}",
            "multi 95 % CI": f"{pct(r['multi_attempt_lo'])} – {pct(r['multi_attempt_hi'])}",
            "ESR": f"{r['esr_k']}/{r['esr_n']} = {pct(r['esr_rate'])}",
            "ESR 95 % CI": f"{pct(r['esr_lo'])} – {pct(r['esr_hi'])}",
            "improvement (of multi)": f"{r['improvement_k']}/{r['improvement_n']} = {pct(r['improvement_rate'])}",
            "mean 1st score": None if r.get("first_score_mean") is None else round(float(r["first_score_mean"]), 1),
            "degraded": f"{r['degraded_k']}/{r['degraded_n']}",
            "dropped": r["n_dropped"],
        })
    return pd.DataFrame(rows)


def dropped_note(summary: dict) -> str | None:
    """Why trials were dropped, per condition (None when none were)."""
    drops = {c: d for c, d in (summary.get("dropped") or {}).items() if d}
    if not drops:
        return None
    return "; ".join(f"{c}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for c, d in drops.items())


def skipped_note(summary: dict) -> str | None:
    """Conditions the run could not carry out, with the reason (None when all ran)."""
    skipped = summary.get("skipped_conditions") or {}
    return "; ".join(f"{c} ({why})" for c, why in skipped.items()) if skipped else None
