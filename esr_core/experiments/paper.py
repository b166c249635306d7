"""The ESR paper's headline numbers (arXiv 2602.06941, ESR_METHOD.md sec. 8) as data.

Used to put our measurements next to the paper's, with model size as context: ESR is
scale-dependent (3.8 % on a 70B model, under 1 % at 8B and below), so a small model
measuring ~0 % is the expected result, not a failure.

Each record: ``model``, ``params_b`` (parameters in billions, approximate), ``condition``
(our condition name for the paper's setting), ``quantity`` (a summary rate name such as
``multi_attempt_rate`` or a derived one), ``value`` (a fraction for rates), ``relation``
("=", "<", "<=": the paper only bounds some values), ``n`` (trials, None when not stated),
``note``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from esr_core.errors import BadInput
from esr_core.experiments.metrics import pooled_rate, rate_ratio, relative_change

_70B = ("Llama-3.3-70B-Instruct", 70.6)

PAPER_NUMBERS: list[dict] = [
    # steering baseline
    {"model": _70B[0], "params_b": _70B[1], "condition": "steering", "quantity": "esr_rate",
     "value": 0.038, "relation": "=", "n": 4877, "note": "ESR = multi-attempt and last > first"},
    {"model": _70B[0], "params_b": _70B[1], "condition": "steering",
     "quantity": "multi_attempt_rate", "value": 0.074, "relation": "=", "n": 4877, "note": ""},
    {"model": "Llama-3.1-8B-Instruct", "params_b": 8.0, "condition": "steering",
     "quantity": "esr_rate", "value": 0.01, "relation": "<", "n": None, "note": ""},
    {"model": "Llama-3.1-8B-Instruct", "params_b": 8.0, "condition": "steering",
     "quantity": "multi_attempt_rate", "value": 0.011, "relation": "<=", "n": None, "note": ""},
]
for _name, _size in (("Gemma-2-2B-it", 2.6), ("Gemma-2-9B-it", 9.2), ("Gemma-2-27B-it", 27.2)):
    PAPER_NUMBERS += [
        {"model": _name, "params_b": _size, "condition": "steering", "quantity": "esr_rate",
         "value": 0.01, "relation": "<", "n": None, "note": ""},
        {"model": _name, "params_b": _size, "condition": "steering",
         "quantity": "multi_attempt_rate", "value": 0.011, "relation": "<=", "n": None, "note": ""},
    ]
PAPER_NUMBERS += [
    {"model": "all models", "params_b": math.nan, "condition": "no_steering",
     "quantity": "multi_attempt_rate", "value": 0.0, "relation": "=", "n": 13118,
     "note": "first-attempt scores 88-92 without steering"},
    # meta-prompt on 70B
    {"model": _70B[0], "params_b": _70B[1], "condition": "meta_prompt",
     "quantity": "multi_attempt_rate", "value": 0.317, "relation": "=", "n": None, "note": ""},
    {"model": _70B[0], "params_b": _70B[1], "condition": "meta_prompt", "quantity": "esr_rate",
     "value": 0.148, "relation": "=", "n": None, "note": ""},
    {"model": _70B[0], "params_b": _70B[1], "condition": "meta_prompt",
     "quantity": "multi_attempt_ratio_vs_steering", "value": 4.3, "relation": "=", "n": None,
     "note": "7.4 % -> 31.7 %"},
    # detector ablation on 70B
    {"model": _70B[0], "params_b": _70B[1], "condition": "detector_ablation",
     "quantity": "multi_attempt_rate", "value": 0.055, "relation": "=", "n": None, "note": ""},
    {"model": _70B[0], "params_b": _70B[1], "condition": "detector_ablation",
     "quantity": "esr_rate", "value": 0.028, "relation": "=", "n": None, "note": ""},
    {"model": _70B[0], "params_b": _70B[1], "condition": "detector_ablation",
     "quantity": "multi_attempt_change_vs_steering", "value": -0.25, "relation": "=", "n": None,
     "note": "relative change, 7.4 % -> 5.5 %"},
    {"model": _70B[0], "params_b": _70B[1], "condition": "detector_ablation",
     "quantity": "esr_change_vs_steering", "value": -0.27, "relation": "=", "n": None,
     "note": "relative change, 3.8 % -> 2.8 %"},
    # random-latent ablation control on 70B
    {"model": _70B[0], "params_b": _70B[1], "condition": "random_ablation",
     "quantity": "multi_attempt_rate", "value": 0.079, "relation": "=", "n": None,
     "note": "same number of random latents"},
    {"model": _70B[0], "params_b": _70B[1], "condition": "random_ablation",
     "quantity": "esr_rate", "value": 0.042, "relation": "=", "n": None, "note": ""},
    # boost sweep and detectors (context only: not comparable from a condition summary)
    {"model": _70B[0], "params_b": _70B[1], "condition": "boost_sweep",
     "quantity": "multi_attempt_rate_peak", "value": 0.027, "relation": "=", "n": None,
     "note": "peak near -0.3 sd from the mean threshold"},
    {"model": _70B[0], "params_b": _70B[1], "condition": "boost_sweep",
     "quantity": "improvement_rate_peak", "value": 0.83, "relation": "=", "n": None,
     "note": "peak near -1 sd from the mean threshold"},
    {"model": _70B[0], "params_b": _70B[1], "condition": "detectors",
     "quantity": "n_detector_latents", "value": 26.0, "relation": "=", "n": None, "note": ""},
    {"model": _70B[0], "params_b": _70B[1], "condition": "detectors",
     "quantity": "detector_activity_off_topic_x_baseline", "value": 4.4, "relation": "=",
     "n": 146, "note": "146 episodes"},
    {"model": _70B[0], "params_b": _70B[1], "condition": "detectors",
     "quantity": "detector_activity_after_correction_x_baseline", "value": 2.1, "relation": "=",
     "n": 146, "note": "146 episodes"},
]

PAPER_COLUMNS = ["model", "params_b", "condition", "quantity", "value", "relation", "n", "note"]

COMPARISON_TABLE_COLUMNS = [
    "condition", "quantity", "paper_model", "paper_params_b", "paper_value", "paper_relation",
    "paper_n", "our_model", "our_params_b", "our_value", "our_lo", "our_hi", "our_k", "our_n",
]


def paper_table() -> pd.DataFrame:
    """The paper's numbers as a DataFrame with :data:`PAPER_COLUMNS`."""
    return pd.DataFrame(PAPER_NUMBERS, columns=PAPER_COLUMNS)


_RATE_QUANTITIES = {"multi_attempt_rate": "multi_attempt", "esr_rate": "esr",
                    "improvement_rate": "improvement"}
_RATIO_QUANTITIES = {"multi_attempt_ratio_vs_steering": ("multi_attempt", "ratio"),
                     "multi_attempt_change_vs_steering": ("multi_attempt", "change"),
                     "esr_change_vs_steering": ("esr", "change")}


def comparison_table(our_summary: pd.DataFrame, model_name: str, n_params: float,
                     condition_col: str = "condition",
                     condition_map: Mapping[str, str] | None = None,
                     baseline: str = "steering") -> pd.DataFrame:
    """Our rates next to the paper's, one row per paper number we measured a counterpart for.

    ``n_params`` is in parameters (e.g. 135e6) or billions (values < 1e4 are read as
    billions). ``condition_map`` maps the paper's condition names (steering, no_steering,
    meta_prompt, detector_ablation, random_ablation) to ours when they differ. Rows from
    several boosts of one condition are pooled (sum of k and n). Ratios and relative
    changes are against ``baseline`` (ours mapped the same way). Columns:
    :data:`COMPARISON_TABLE_COLUMNS`; ``our_lo``/``our_hi`` are Wilson 95 % for rates
    and NaN for ratios.
    """
    if our_summary is None or our_summary.empty:
        return pd.DataFrame(columns=COMPARISON_TABLE_COLUMNS)
    if condition_col not in our_summary.columns:
        raise BadInput(f"summary has no '{condition_col}' column")
    params_b = float(n_params) / 1e9 if float(n_params) >= 1e4 else float(n_params)
    cmap = dict(condition_map or {})
    ours = {str(c): part for c, part in our_summary.groupby(condition_col)}
    our_base = ours.get(cmap.get(baseline, baseline))
    rows = []
    for rec in PAPER_NUMBERS:
        our_cond = cmap.get(rec["condition"], rec["condition"])
        part = ours.get(our_cond)
        if part is None:
            continue
        q = rec["quantity"]
        if q in _RATE_QUANTITIES:
            p = pooled_rate(part, _RATE_QUANTITIES[q])
            value, lo, hi, k, n = p["rate"], p["lo"], p["hi"], p["k"], p["n"]
        elif q in _RATIO_QUANTITIES and our_base is not None:
            metric, kind = _RATIO_QUANTITIES[q]
            a, b = pooled_rate(part, metric), pooled_rate(our_base, metric)
            value = (rate_ratio if kind == "ratio" else relative_change)(a["rate"], b["rate"])
            lo = hi = math.nan
            k, n = a["k"], a["n"]
        else:
            continue
        rows.append({"condition": our_cond, "quantity": q, "paper_model": rec["model"],
                     "paper_params_b": rec["params_b"], "paper_value": rec["value"],
                     "paper_relation": rec["relation"], "paper_n": rec["n"],
                     "our_model": model_name, "our_params_b": params_b, "our_value": value,
                     "our_lo": lo, "our_hi": hi, "our_k": k, "our_n": n})
    return pd.DataFrame(rows, columns=COMPARISON_TABLE_COLUMNS)
