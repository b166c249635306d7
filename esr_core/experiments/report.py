"""What a run says: the JSON summary, one honest headline, tables and text, and its figures.

Shared by the Experiments page and ``esr-lab experiment summary|plots``, so both always say
the same thing about a run (rates with Wilson intervals, drops and skips, the comparison with
the paper's numbers).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd

from esr_core.experiments.cases import cases_sentence
from esr_core.experiments.metrics import compare_to_baseline, pool_by, summarise, trial_table_flags
from esr_core.experiments.overlay_summary import load_overlay
from esr_core.experiments.paper import comparison_table
from esr_core.experiments.spec import ExperimentSpec, plan_trials
from esr_core.experiments.store import PARQUET_FILE, SUMMARY_FILE, load_spec, load_trials, trial_table
from esr_core.io import atomic_write_bytes, atomic_write_json
from esr_core.models.registry import get_entry
from esr_core.viz.result_plots import (
    condition_comparison_figure,
    correction_overlay_figure,
    first_last_scatter,
    rates_vs_boost_figure,
    score_delta_figure,
)


def model_params(model: str) -> float:
    """The model's parameter count from the registry (NaN when unknown)."""
    e = get_entry(model)
    return float(e.n_params) if e is not None and e.n_params else math.nan


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


def models_table(summary: dict, other: dict) -> pd.DataFrame:
    """Two models on the same plan (a run made with ``--like``), one row per condition: each
    model's multi-attempt and ESR counts with Wilson 95 % intervals, and its mean first score."""
    mine = {r["condition"]: r for r in summary.get("by_condition", [])}
    theirs = {r["condition"]: r for r in other.get("by_condition", [])}
    a, b = other.get("model", "other"), summary.get("model", "this")

    def cell(r, q):
        if r is None:
            return "n/a"
        return f"{r[q + '_k']}/{r[q + '_n']} = {pct(r[q + '_rate'])} [{pct(r[q + '_lo'])} – {pct(r[q + '_hi'])}]"

    rows = []
    for c in [c for c in theirs if c in mine] + [c for c in mine if c not in theirs]:
        o, m = theirs.get(c), mine.get(c)
        rows.append({"condition": c, f"multi-attempt · {a}": cell(o, "multi_attempt"),
                     f"multi-attempt · {b}": cell(m, "multi_attempt"), f"ESR · {a}": cell(o, "esr"),
                     f"ESR · {b}": cell(m, "esr"),
                     f"1st score · {a}": None if not o or o.get("first_score_mean") is None
                     else round(float(o["first_score_mean"]), 1),
                     f"1st score · {b}": None if not m or m.get("first_score_mean") is None
                     else round(float(m["first_score_mean"]), 1)})
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


def paper_value(q: str, v) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(v):
        return "n/a"
    if q.endswith("_rate"):
        return pct(v)
    if "ratio" in q:
        return f"{v:.2f}×"
    if "change" in q:
        return f"{100 * v:+.0f} %"
    return f"{v:g}"


def model_size(b) -> str:
    try:
        b = float(b)
    except (TypeError, ValueError):
        return ""
    return "" if not math.isfinite(b) else (f" ({b:g}B)" if b >= 1 else f" ({b * 1000:.0f}M)")


def _count(n) -> str:
    try:
        n = float(n)
    except (TypeError, ValueError):
        return "n/a"
    return f"{int(n):,}" if math.isfinite(n) else "n/a"


def paper_table(summary: dict) -> pd.DataFrame:
    """Our rates next to the paper's, one row per (condition, quantity)."""
    rows = []
    for r in summary.get("paper_comparison", []):
        q = str(r["quantity"])
        rel = r.get("paper_relation") or "="
        rows.append({"condition": r["condition"], "quantity": q.replace("_", " "),
                     "paper": ("" if rel == "=" else rel + " ") + paper_value(q, r.get("paper_value")),
                     "paper model": f"{r.get('paper_model')}{model_size(r.get('paper_params_b'))}",
                     "paper n": _count(r.get("paper_n")),
                     "ours": paper_value(q, r.get("our_value")),
                     "ours 95 % CI": f"{pct(r.get('our_lo'))} – {pct(r.get('our_hi'))}" if q.endswith("_rate") else "",
                     "our k/n": f"{r.get('our_k')}/{r.get('our_n')}",
                     "our model": f"{r.get('our_model')}{model_size(r.get('our_params_b'))}"})
    return pd.DataFrame(rows)


def _pct_cell(x) -> str:
    return "  n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * float(x):5.1f}%"


def summary_text(summary: dict, run_dir) -> str:
    lines = [f"run: {summary.get('name')} ({run_dir})",
             f"model {summary.get('model')}, SAE {summary.get('sae')} at {summary.get('hook')}, judge "
             f"{summary.get('judge_id')}, {summary.get('n_trials')} of {summary.get('n_trials_planned')} trials",
             f"{'condition':<34}{'n':>5}{'valid':>6}  {'multi-attempt (95% Wilson)':<30}{'ESR (95% Wilson)':<30}"
             f"{'1st score':>9}"]
    for r in summary.get("by_condition", []):
        m = f"{r['multi_attempt_k']}/{r['multi_attempt_n']} {_pct_cell(r['multi_attempt_rate'])} [{_pct_cell(r['multi_attempt_lo'])},{_pct_cell(r['multi_attempt_hi'])}]"
        e = f"{r['esr_k']}/{r['esr_n']} {_pct_cell(r['esr_rate'])} [{_pct_cell(r['esr_lo'])},{_pct_cell(r['esr_hi'])}]"
        fs = r.get("first_score_mean")
        fs = f"{fs:9.1f}" if isinstance(fs, (int, float)) else f"{'n/a':>9}"
        lines.append(f"{str(r['condition']):<34}{r['n_trials']:>5}{r['n_valid']:>6}  {m:<30}{e:<30}{fs}")
    if dropped_note(summary):
        lines.append("dropped: " + dropped_note(summary))
    if skipped_note(summary):
        lines.append("skipped: " + skipped_note(summary))
    thr = summary.get("throughput") or {}
    if thr.get("tokens_per_s"):
        lines.append(f"generation: {thr['generated_tokens']} tokens in {thr['generation_seconds']} s "
                     f"({thr['tokens_per_s']} tokens/s, {summary.get('environment', {}).get('device', '?')})")
    lines.append(summary.get("headline", ""))
    return "\n".join(lines)


def _records(df: pd.DataFrame) -> list[dict]:
    return json.loads(df.to_json(orient="records", double_precision=6)) if len(df) else []


def summarise_run(trials: pd.DataFrame, spec: ExperimentSpec) -> dict:
    """The JSON summary: per condition, per boost level, against steering and against the paper."""
    by_cond = summarise(trials, by=("condition",)) if len(trials) else pd.DataFrame()
    by_boost = summarise(trials.assign(boost_norm=trials["boost_norm"].astype(float).round(3)),
                         by=("condition", "boost_norm")) if len(trials) else pd.DataFrame()
    comp = pd.DataFrame()
    if len(by_cond) and "steering" in set(by_cond["condition"]):
        comp = compare_to_baseline(by_cond, baseline="steering")
    paper = pd.DataFrame()
    if len(by_cond):
        paper = comparison_table(by_cond, spec.model, model_params(spec.model))
    planned = len(plan_trials(spec)) if spec.resolved else None
    n_per = {str(r["condition"]): int(r["n_trials"]) for _, r in by_cond.iterrows()} if len(by_cond) else {}
    dropped = {}
    for _, r in by_cond.iterrows():
        dropped[str(r["condition"])] = {k[len("n_dropped_"):]: int(r[k]) for k in r.index
                                        if k.startswith("n_dropped_") and int(r[k])}
    thr = _throughput(trials)
    out = {"name": spec.name, "model": spec.model, "sae": spec.sae or "default", "hook": spec.hook,
           "judge_id": spec.judge_id, "relevance_rule": spec.relevance_rule, "boost_mode": spec.boost_mode,
           "n_latents": len(spec.latents), "prompts_per_latent": spec.prompts_per_latent,
           "max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature,
           "repetition_penalty": spec.repetition_penalty,
           "n_trials_planned": planned, "n_trials": int(len(trials)), "complete": planned == len(trials),
           "n_per_condition": n_per, "dropped": dropped, "skipped_conditions": spec.skipped_conditions,
           "by_condition": _records(by_cond), "by_boost": _records(by_boost),
           "vs_steering": _records(comp), "paper_comparison": _records(paper), "throughput": thr,
           "environment": spec.environment, "like": spec.like}
    cases = cases_sentence(trial_table_flags(trials)) if len(trials) else ""
    out["headline"] = headline(by_cond, spec) + (f" {cases}" if cases else "")
    out["esr_cases"] = cases
    return out


def _throughput(trials: pd.DataFrame) -> dict:
    if not len(trials) or "batch_id" not in trials.columns:
        return {}
    b = trials.dropna(subset=["batch_id"]).drop_duplicates("batch_id")
    if not len(b):
        return {}
    tok = float(b["batch_tokens"].sum())
    sec = float(b["batch_s"].sum())
    return {"generated_tokens": int(tok), "generation_seconds": round(sec, 1),
            "tokens_per_s": round(tok / sec, 1) if sec > 0 else None, "batches": int(len(b))}


def headline(by_cond: pd.DataFrame, spec: ExperimentSpec) -> str:
    """One honest sentence on what the numbers say about ESR for this model."""
    if by_cond is None or not len(by_cond) or "steering" not in set(by_cond["condition"]):
        return "No steered trials yet: nothing can be said about ESR for this run."
    r = by_cond[by_cond["condition"] == "steering"].iloc[0]
    params = model_params(spec.model)
    params = None if math.isnan(params) else params
    size = f"{params / 1e6:.0f}M-parameter " if params and params < 1e9 else ""
    s = (f"Under steering the {size}{spec.model} restarted in {pct(r['multi_attempt_rate'])} of "
         f"{int(r['n_valid'])} valid trials and improved after a restart (ESR) in {pct(r['esr_rate'])} "
         f"(95 % Wilson {pct(r['esr_lo'])}-{pct(r['esr_hi'])})")
    if float(r["esr_hi"]) < 0.038:
        s += ", below the paper's 3.8 % for Llama-3.3-70B and consistent with its finding that smaller models show little or no ESR"
    elif float(r["esr_rate"]) >= 0.038:
        s += ", at or above the paper's 70B rate, which at this size more likely reflects the judge than real self-correction"
    else:
        s += "; the interval is too wide to separate it from the paper's 3.8 % (70B)"
    meta = by_cond[by_cond["condition"] == "meta_prompt"]
    if len(meta):
        m = meta.iloc[0]
        s += f". With the meta-prompt the multi-attempt rate was {pct(m['multi_attempt_rate'])}"
    return s + "."


def finalize(run_dir: str | Path) -> dict:
    """Write ``trials.parquet`` and ``summary.json`` atomically from the logs; returns the summary."""
    run_dir = Path(run_dir)
    spec = load_spec(run_dir)
    df = trial_table(run_dir, spec)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(run_dir / PARQUET_FILE, buf.getvalue())
    summary = summarise_run(df, spec)
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def load_summary(run_dir: str | Path, recompute: bool = False) -> dict:
    run_dir = Path(run_dir)
    p = run_dir / SUMMARY_FILE
    if p.exists() and not recompute:
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except ValueError:
            pass
    return summarise_run(load_trials(run_dir), load_spec(run_dir))


def figures_for(trials: pd.DataFrame, spec: ExperimentSpec | None = None) -> dict:
    """The result figures of a run (name -> plotly figure); empty-safe."""
    flagged = trial_table_flags(trials) if len(trials) else pd.DataFrame()
    by_cond = summarise(trials, by=("condition",)) if len(trials) else pd.DataFrame()
    figs = {"score_delta": score_delta_figure(flagged, by_cond)}
    base = "steering" if len(by_cond) and "steering" in set(by_cond["condition"]) else None
    figs["condition_comparison"] = condition_comparison_figure(pool_by(by_cond), baseline=base)
    x = "boost_sd" if len(trials) and "boost_sd" in trials and trials["boost_sd"].notna().any() else "boost_norm"
    if len(trials):
        t = trials.assign(**{x: trials[x].astype(float).round(3)})
        figs["rates_vs_boost"] = rates_vs_boost_figure(summarise(t, by=("condition", x)), x=x)
    else:
        figs["rates_vs_boost"] = rates_vs_boost_figure(pd.DataFrame(), x=x)
    figs["first_last"] = first_last_scatter(flagged)
    return figs


def run_figures(run_dir: str | Path) -> dict:
    """The result figures, plus the correction overlay per source when ``overlay.json`` exists."""
    run_dir = Path(run_dir)
    figs = figures_for(load_trials(run_dir), load_spec(run_dir))
    ov = load_overlay(run_dir)
    for source in (ov or {}).get("sources", {}):
        figs[f"correction_overlay_{source}"] = correction_overlay_figure(ov, source)
    return figs


