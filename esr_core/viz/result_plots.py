"""Result figures for ESR experiments: pure functions from trial tables / summaries to plotly.

Every function accepts an empty input and returns an annotated empty figure instead of
raising, so an app page or a report can always draw something. Colours are the Okabe-Ito
palette (colour-blind safe); every rate has its k/n in the hover text.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from esr_core.errors import EsrError
from esr_core.io import atomic_write_bytes, atomic_write_text
from esr_core.viz import palette

# Okabe-Ito, without black (kept for text and the y = x line)
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442"]
RATE_COLOURS = {"multi_attempt": "#0072B2", "esr": "#D55E00", "improvement": "#009E73",
                "degraded": "#CC79A7"}
RATE_LABELS = {"multi_attempt": "Multi-attempt rate", "esr": "ESR rate",
               "improvement": "Improvement rate", "degraded": "Degraded-output rate"}
NEUTRAL = "#555555"
FEW_TRIALS = 5  # fewer multi-attempt trials than this: markers, not a histogram


def condition_colours(conditions: Sequence[str]) -> dict[str, str]:
    """Stable colour per condition: sorted names get the palette in order."""
    names = sorted({str(c) for c in conditions})
    return {c: OKABE_ITO[i % len(OKABE_ITO)] for i, c in enumerate(names)}


def empty_figure(title: str, message: str = "No trials yet: run an experiment to fill this chart.") -> go.Figure:
    """An empty figure that says why it is empty."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper",
                       showarrow=False, font={"size": 14, "color": NEUTRAL})
    fig.update_layout(title=title, xaxis={"visible": False}, yaxis={"visible": False},
                      template="plotly_white")
    return fig


def _fmt_pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def _rate_hover(summary: pd.DataFrame, metric: str) -> list[str]:
    out = []
    for _, r in summary.iterrows():
        out.append(f"{RATE_LABELS.get(metric, metric)}: {_fmt_pct(r[f'{metric}_rate'])}"
                   f"<br>k/n = {int(r[f'{metric}_k'])}/{int(r[f'{metric}_n'])}"
                   f"<br>Wilson 95 %: [{_fmt_pct(r[f'{metric}_lo'])}, {_fmt_pct(r[f'{metric}_hi'])}]")
    return out


def _error_arrays(summary: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rate = summary[f"{metric}_rate"].astype(float).to_numpy()
    lo = summary[f"{metric}_lo"].astype(float).to_numpy()
    hi = summary[f"{metric}_hi"].astype(float).to_numpy()
    return rate, np.nan_to_num(hi - rate), np.nan_to_num(rate - lo)


def _rate_bar(summary: pd.DataFrame, metric: str, x: Sequence, name: str | None = None,
              colour: str | None = None, showlegend: bool = True) -> go.Bar:
    rate, plus, minus = _error_arrays(summary, metric)
    return go.Bar(x=list(x), y=rate, name=name or RATE_LABELS.get(metric, metric),
                  marker_color=colour or RATE_COLOURS.get(metric, OKABE_ITO[0]),
                  error_y={"type": "data", "array": plus, "arrayminus": minus, "visible": True},
                  hovertext=_rate_hover(summary, metric), hoverinfo="text+x",
                  showlegend=showlegend)


def _condition_series(df: pd.DataFrame, condition_col: str) -> pd.Series:
    if condition_col in df.columns:
        return df[condition_col].astype(str)
    return pd.Series("all", index=df.index)


# ---------------------------------------------------------------------------
# figures

def score_delta_figure(flagged: pd.DataFrame, summary: pd.DataFrame, condition_col: str = "condition",
                       bin_size: float = 10.0) -> go.Figure:
    """Left: histogram of last - first score over multi-attempt trials, per condition.
    Right: multi-attempt and ESR rates per condition with Wilson 95 % intervals.

    ``flagged``: the trial table with its per-trial flags (``trial_table_flags``); ``summary``:
    one row per condition (``summarise``)."""
    title = "Score change after a restart, and how often it happens"
    if flagged is None or flagged.empty or summary is None or summary.empty:
        return empty_figure(title)
    flagged = flagged.copy()
    flagged["_cond"] = _condition_series(flagged, condition_col)
    colours = condition_colours(summary[condition_col])
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], subplot_titles=(
        "Δ score, multi-attempt trials", "Rates, Wilson 95 %"))
    multi = flagged[flagged["valid"] & flagged["multi_attempt"]]
    for cond, group in multi.groupby("_cond", sort=True):
        if len(group) < FEW_TRIALS:  # a bar for one trial hides its value: one marker per trial instead
            d = group["delta"].astype(float).tolist()
            fig.add_trace(go.Scatter(
                x=d, y=[sum(1 for v in d[: k + 1] if v == x) for k, x in enumerate(d)], mode="markers",
                name=f"Δ score · {cond}", legendgroup=f"delta-{cond}", marker={"size": 11, "symbol": "diamond",
                                                                             "color": colours.get(cond, OKABE_ITO[0])},
                hovertemplate=f"{cond}<br>Δ score %{{x:.3g}} (one trial)<extra></extra>"), row=1, col=1)
            continue
        fig.add_trace(go.Histogram(
            x=group["delta"], name=f"Δ score · {cond}", legendgroup=f"delta-{cond}",
            marker_color=colours.get(cond, OKABE_ITO[0]), opacity=0.75,
            xbins={"start": -100 - bin_size / 2, "end": 100 + bin_size / 2, "size": bin_size},
            hovertemplate=f"{cond}<br>Δ score %{{x}}<br>trials: %{{y}} of {len(group)}<extra></extra>"),
            row=1, col=1)
    if multi.empty:
        fig.add_annotation(text="No multi-attempt trials: nothing to compare", x=0, y=0,
                           xref="x", yref="y", showarrow=False, font={"color": NEUTRAL})
    conds = summary[condition_col].astype(str).tolist()
    for metric in ("multi_attempt", "esr"):
        fig.add_trace(_rate_bar(summary, metric, conds), row=1, col=2)
    fig.add_vline(x=0, line_dash="dot", line_color=NEUTRAL, row=1, col=1)
    fig.update_layout(title=title, barmode="group", template="plotly_white",
                      legend_title_text="Series")
    fig.update_xaxes(title_text="last − first score (0–100 scale)", range=[-105, 105], row=1, col=1)
    fig.update_yaxes(title_text="trials", rangemode="tozero", row=1, col=1)
    fig.update_xaxes(title_text="condition", row=1, col=2)
    fig.update_yaxes(title_text="share of valid trials", tickformat=".0%", rangemode="tozero",
                     row=1, col=2)
    return fig


def rates_vs_boost_figure(summary: pd.DataFrame, x: str = "boost_sd",
                          condition_col: str = "condition",
                          metrics: Sequence[str] = ("multi_attempt", "esr", "improvement"),
                          x_label: str | None = None) -> go.Figure:
    """Rates against the (normalised) boost, one line per metric (and condition), error bars.

    ``summary`` must be grouped by ``x`` (e.g. ``summarise(trials, by=("condition",
    "boost_sd"))``). Improvement rate (a share of multi-attempt trials) goes in its own
    lower panel because it lives on a much larger scale than the other two.
    """
    title = "ESR rates against steering strength"
    if summary is None or summary.empty:
        return empty_figure(title)
    if x not in summary.columns:
        return empty_figure(title, f"The summary has no '{x}' column: group the trials by it.")
    labels = {"boost_sd": "boost (sd from the mean calibrated threshold)",
              "boost_norm": "boost (× median residual norm)", "boost": "boost (raw residual units)"}
    top = [m for m in metrics if m != "improvement"]
    bottom = [m for m in metrics if m == "improvement"]
    with_score = "first_score_mean" in summary.columns and summary["first_score_mean"].notna().any()
    panels = ((["rates"] if top else []) + (["improvement"] if bottom else []) + (["score"] if with_score else []))
    titles = {"rates": "Share of valid trials", "improvement": "Share of multi-attempt trials that improved",
              "score": "Mean first-attempt score (0-100; what the calibration targets)"}
    rows = len(panels)
    row_of = {p: i + 1 for i, p in enumerate(panels)}
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[titles[p] for p in panels])
    cond = _condition_series(summary, condition_col)
    many = cond.nunique() > 1
    dashes = ["solid", "dash", "dot", "dashdot", "longdash"]
    for ci, c in enumerate(sorted(cond.unique())):
        part = summary[cond == c].sort_values(x)
        xs = part[x].astype(float)
        for metric in metrics:
            row = row_of["improvement" if metric == "improvement" else "rates"]
            rate, plus, minus = _error_arrays(part, metric)
            name = RATE_LABELS.get(metric, metric) + (f" · {c}" if many else "")
            fig.add_trace(go.Scatter(
                x=xs, y=rate, mode="lines+markers", name=name,
                line={"color": RATE_COLOURS.get(metric), "dash": dashes[ci % len(dashes)]},
                error_y={"type": "data", "array": plus, "arrayminus": minus, "visible": True},
                hovertext=[f"{c}<br>{x} = {v:.3g}<br>{h}" for v, h in zip(xs, _rate_hover(part, metric))],
                hoverinfo="text"), row=row, col=1)
        if with_score:
            m = part["first_score_mean"].astype(float)
            lo = part.get("first_score_lo", m).astype(float)
            hi = part.get("first_score_hi", m).astype(float)
            n = part.get("first_score_n", pd.Series([None] * len(part), index=part.index))
            fig.add_trace(go.Scatter(
                x=xs, y=m, mode="lines+markers", name="Mean first-attempt score" + (f" · {c}" if many else ""),
                line={"color": NEUTRAL, "dash": dashes[ci % len(dashes)]},
                error_y={"type": "data", "array": (hi - m).clip(lower=0), "arrayminus": (m - lo).clip(lower=0),
                         "visible": True},
                hovertext=[f"{c}<br>{x} = {v:.3g}<br>mean {a:.1f} (95 % CI {b:.1f}-{d:.1f}, n {k})"
                           for v, a, b, d, k in zip(xs, m, lo, hi, n)],
                hoverinfo="text"), row=row_of["score"], col=1)
    fig.update_layout(title=title, template="plotly_white", legend_title_text="Rate",
                      height=300 + 180 * rows)
    fig.update_xaxes(title_text=x_label or labels.get(x, x), row=rows, col=1)
    for p_ in panels:
        if p_ == "score":
            fig.update_yaxes(range=[0, 100], title_text="score", row=row_of[p_], col=1)
        elif p_ == "improvement":
            fig.update_yaxes(tickformat=".0%", range=[0, 1.05], title_text="rate", row=row_of[p_], col=1)
        else:
            fig.update_yaxes(tickformat=".0%", rangemode="tozero", title_text="rate", row=row_of[p_], col=1)
    if "improvement" in row_of and not any(
            np.isfinite(np.asarray(t.y, dtype=float)).any() for t in fig.data
            if t.name and t.name.startswith(RATE_LABELS.get("improvement", "improvement"))):
        k = row_of["improvement"]
        fig.add_annotation(text="no multi-attempt trials at any level: nothing to improve",
                           xref=f"x{k if k > 1 else ''} domain", yref=f"y{k if k > 1 else ''} domain",
                           x=0.5, y=0.5, showarrow=False, font={"color": NEUTRAL})
    if x == "boost_sd":
        fig.add_vline(x=0, line_dash="dot", line_color=NEUTRAL)
    return fig


def condition_comparison_figure(pooled: pd.DataFrame, baseline: str | None = "steering",
                                condition_col: str = "condition",
                                metrics: Sequence[str] = ("multi_attempt", "esr", "improvement")
                                ) -> go.Figure:
    """One panel per rate; one bar per condition with Wilson intervals; baseline as a dashed line.

    ``pooled``: one row per condition with ``{metric}_k/_n/_rate/_lo/_hi`` (``pool_by``)."""
    title = "Conditions compared"
    if pooled is None or pooled.empty:
        return empty_figure(title)
    if condition_col not in pooled.columns:
        return empty_figure(title, f"The summary has no '{condition_col}' column.")
    if pooled[condition_col].duplicated().any():
        return empty_figure(title, "One row per condition is needed: pool the summary first.")
    pooled = pooled.assign(**{condition_col: pooled[condition_col].astype(str)}).sort_values(condition_col)
    conds = pooled[condition_col].tolist()
    colours = condition_colours(conds)
    fig = make_subplots(rows=1, cols=len(metrics),
                        subplot_titles=[RATE_LABELS.get(m, m) for m in metrics])
    for j, m in enumerate(metrics, start=1):
        fig.add_trace(_rate_bar(pooled, m, conds, name=RATE_LABELS.get(m, m),
                                colour=None, showlegend=False), row=1, col=j)
        fig.data[-1].marker.color = [colours[c] for c in conds]
        if baseline is not None and baseline in conds:
            b = float(pooled.loc[pooled[condition_col] == baseline, f"{m}_rate"].iloc[0])
            if math.isfinite(b):
                fig.add_trace(go.Scatter(
                    x=[conds[0], conds[-1]], y=[b, b], mode="lines",
                    name=f"baseline ({baseline})", legendgroup="baseline", showlegend=(j == 1),
                    line={"dash": "dash", "color": "#000000"},
                    hovertext=f"baseline {baseline}: {_fmt_pct(b)}", hoverinfo="text"),
                    row=1, col=j)
        fig.update_yaxes(tickformat=".0%", rangemode="tozero", row=1, col=j)
        fig.update_xaxes(title_text="condition", row=1, col=j)
    fig.update_yaxes(title_text="rate (Wilson 95 %)", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", showlegend=True)
    return fig


def first_last_scatter(flagged: pd.DataFrame, condition_col: str = "condition",
                       multi_only: bool = True) -> go.Figure:
    """First vs last attempt score per trial (``flagged``: the flagged trial table); points
    above y = x improved after restarting."""
    title = "First vs last attempt score"
    if flagged is None or flagged.empty:
        return empty_figure(title)
    pts = flagged[flagged["valid"] & (flagged["multi_attempt"] if multi_only else True)].copy()
    if pts.empty:
        fig = empty_figure(title, "No multi-attempt trials: every answer had one attempt.")
    else:
        fig = go.Figure()
    pts["_cond"] = _condition_series(pts, condition_col)
    colours = condition_colours(pts["_cond"])
    for cond, g in pts.groupby("_cond", sort=True):
        hover = []
        for _, r in g.iterrows():
            bits = [f"{cond}", f"first {r['first_score']:.0f} → last {r['last_score']:.0f}",
                    f"attempts: {int(r['n_attempts'])}"]
            for col in ("prompt_id", "seed", "boost_norm", "latent"):
                if col in g.columns and not pd.isna(r[col]):
                    bits.append(f"{col}: {r[col]}")
            hover.append("<br>".join(bits))
        fig.add_trace(go.Scatter(x=g["first_score"], y=g["last_score"], mode="markers",
                                 name=f"{cond} (n={len(g)})", marker={"color": colours[cond],
                                                                      "size": 8, "opacity": 0.8},
                                 hovertext=hover, hoverinfo="text"))
    fig.add_trace(go.Scatter(x=[0, 100], y=[0, 100], mode="lines", name="y = x (no change)",
                             line={"dash": "dash", "color": "#000000"}, hoverinfo="skip"))
    fig.update_layout(title=title, template="plotly_white",
                      xaxis={"title": "first attempt score", "range": [-2, 102], "visible": True},
                      yaxis={"title": "last attempt score", "range": [-2, 102], "visible": True,
                             "scaleanchor": "x"},
                      legend_title_text="Condition")
    return fig


OVERLAY_SIGNALS = {"circuit": ("resistance circuit", "#D55E00"), "backtracking": ("backtracking", "#0072B2"),
                   "distractor": ("distractor latent", "#009E73")}


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[k:k + 2], 16) for k in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _num_array(values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def correction_overlay_figure(overlay: Mapping | None, source: str = "synthetic", scale: str = "auto") -> go.Figure:
    """A saved correction overlay (:mod:`esr_core.experiments.overlay`) for one source.

    Top: mean EMA activity per token offset from the correction (0 = first token of the
    restart phrase), one line per signal with a ±1 s.e. band. ``scale`` "baseline" divides
    the circuit and backtracking by their on-topic baseline (1 = on-topic level, the paper's
    "x above baseline"), "raw" keeps group sums with dotted baseline lines, "auto" picks
    "baseline" when both baselines are positive. The distractor (steered replays only) is
    raw on its own right-hand axis. Bottom: episodes contributing at each offset (n; NaN
    padding elsewhere).
    """
    title = "Activity around the correction point"
    block = ((overlay or {}).get("sources") or {}).get(source)
    if not block or not block.get("n_episodes") or not block.get("signals"):
        return empty_figure(title, "No recovery episodes for this source: compute the overlay first.")
    signals = block["signals"]
    base = (overlay or {}).get("baseline") or {}
    if scale == "auto":
        ok = all((base.get(k) or 0) > 0 for k in ("circuit", "backtracking") if k in signals)
        scale = "baseline" if ok else "raw"
    if scale not in ("baseline", "raw"):
        raise EsrError(f"scale must be auto, baseline or raw, got {scale!r}")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.74, 0.26], vertical_spacing=0.06,
                        specs=[[{"secondary_y": True}], [{}]])
    n_ref, x_ref = None, None
    for key, (label, colour) in OVERLAY_SIGNALS.items():
        s = signals.get(key)
        if not s:
            continue
        x = np.asarray(s["offsets"], dtype=float)
        mean, se, n = _num_array(s["mean"]), _num_array(s["se"]), np.asarray(s["n"], dtype=int)
        n_ref = n if n_ref is None else np.maximum(n_ref, n)
        x_ref = x
        secondary = key == "distractor"
        b = base.get(key)
        unit = ""
        if scale == "baseline" and not secondary and b:
            mean, se, unit = mean / b, se / b, "× baseline"
        elif not secondary and b is not None and x.size:
            fig.add_trace(go.Scatter(x=[x[0], x[-1]], y=[b, b], mode="lines", name=f"{label}: on-topic baseline",
                                     legendgroup=key, line={"color": colour, "dash": "dot", "width": 1},
                                     hovertemplate=f"{label} on-topic baseline %{{y:.3g}}<extra></extra>"),
                          row=1, col=1, secondary_y=False)
        band = np.isfinite(mean) & np.isfinite(se)
        if band.any():
            xb = x[band]
            fig.add_trace(go.Scatter(x=np.concatenate([xb, xb[::-1]]),
                                     y=np.concatenate([(mean + se)[band], (mean - se)[band][::-1]]),
                                     fill="toself", fillcolor=_rgba(colour, 0.18), line={"width": 0},
                                     name=f"{label} ±1 s.e.", legendgroup=key, showlegend=False,
                                     hoverinfo="skip"), row=1, col=1, secondary_y=secondary)
        fig.add_trace(go.Scatter(x=x, y=mean, mode="lines", name=label + (" (right axis)" if secondary else ""),
                                 legendgroup=key, line={"color": colour, "width": 2},
                                 customdata=np.stack([n, np.nan_to_num(se)], 1),
                                 hovertemplate=f"{label}<br>offset %{{x}}<br>mean %{{y:.3g}} {unit} "
                                               f"± %{{customdata[1]:.2g}}<br>episodes: %{{customdata[0]}}<extra></extra>"),
                      row=1, col=1, secondary_y=secondary)
    if scale == "baseline" and x_ref is not None and x_ref.size:
        fig.add_trace(go.Scatter(x=[x_ref[0], x_ref[-1]], y=[1, 1], mode="lines", name="on-topic baseline (1×)",
                                 line={"color": NEUTRAL, "dash": "dot", "width": 1}, hoverinfo="skip"),
                      row=1, col=1, secondary_y=False)
    if n_ref is not None:
        fig.add_trace(go.Bar(x=x_ref, y=n_ref, name="episodes (n)", marker_color="#999999",
                             hovertemplate="offset %{x}<br>episodes: %{y}<extra></extra>"), row=2, col=1)
    fig.add_vline(x=0, line_dash="dash", line_color="#000000", row="all", col=1)
    ratios = ((overlay or {}).get("ratios") or {}).get(source, {}).get("circuit", {})

    def fr(v):
        return "n/a" if v is None else f"{v:.1f}×"

    n_ep = int(block["n_episodes"])
    sub = (f"{block.get('label', source)}: {n_ep} episode{'s' if n_ep != 1 else ''}, steering "
           f"{block.get('steering')}<br>circuit vs on-topic baseline: off-topic {fr(ratios.get('off_topic'))}, "
           f"after the correction {fr(ratios.get('after_correction'))} (paper, 146 episodes: 4.4× / 2.1×)")
    fig.update_layout(title={"text": f"{title}<br><sup>{sub}</sup>"}, template="plotly_white",
                      legend={"orientation": "h", "yanchor": "top", "y": -0.16, "x": 0}, bargap=0.1,
                      margin={"t": 110})
    fig.update_xaxes(title_text="tokens relative to the correction (0 = first token of the restart phrase)",
                     row=2, col=1)
    alpha = (overlay or {}).get("ema_alpha")
    ytitle = "× on-topic baseline" if scale == "baseline" else "group sum"
    fig.update_yaxes(title_text=f"{ytitle} (EMA α={alpha})" if alpha else ytitle, row=1, col=1,
                     secondary_y=False, rangemode="tozero")
    if "distractor" in signals:
        fig.update_yaxes(title_text="distractor activation", row=1, col=1, secondary_y=True, showgrid=False,
                         rangemode="tozero")
    top = int(n_ref.max()) if n_ref is not None and n_ref.size else 1
    fig.update_yaxes(title_text="n", row=2, col=1, rangemode="tozero", tickformat="d",
                     dtick=max(1, math.ceil(top / 4)))
    return fig


# ---------------------------------------------------------------------------
# export

def kaleido_available() -> bool:
    try:
        import kaleido  # noqa: F401  # heavy: kaleido (PNG export)
    except ImportError:
        return False
    return True


def _readable(path: Path) -> None:
    """Exported figures are meant to be shared: usual file mode instead of the temp file's 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def export_figure(fig: go.Figure, path: str | os.PathLike, png: bool = True,
                  scale: float = 2.0) -> list[Path]:
    """Write ``<path>.html`` (plotly.js embedded: opens offline) and, if ``png``, ``<path>.png``.

    The HTML is always written first. PNG needs the ``kaleido`` package and a Chrome or
    Chromium (Debian's /usr/bin/chromium is picked up via BROWSER_PATH); when either is
    missing an :class:`EsrError` names it, and the HTML is still there.
    """
    base = Path(path)
    if base.suffix.lower() in (".html", ".htm", ".png"):
        base = base.with_suffix("")
    html_path = base.with_name(base.name + ".html")
    atomic_write_text(html_path, fig.to_html(include_plotlyjs=True, full_html=True))
    _readable(html_path)
    written = [html_path]
    if not png:
        return written
    if not kaleido_available():
        raise EsrError(f"PNG export needs the 'kaleido' package (pip install kaleido); "
                       f"the HTML was written to {html_path}")
    if not os.environ.get("BROWSER_PATH"):
        for name in ("chromium", "chromium-browser", "google-chrome"):
            found = shutil.which(name)
            if found:
                os.environ["BROWSER_PATH"] = found
                break
    try:
        data = fig.to_image(format="png", scale=scale)
    except Exception as exc:  # kaleido raises several types when no browser can start
        raise EsrError(f"PNG export failed: kaleido could not start Chrome/Chromium "
                       f"(install chromium or set BROWSER_PATH): {exc}".splitlines()[0]) from exc
    png_path = base.with_name(base.name + ".png")
    atomic_write_bytes(png_path, data)
    _readable(png_path)
    written.append(png_path)
    return written


def attribution_figure(report: Mapping | None) -> go.Figure:
    """Restart drivers: mean attribution of the top latents, and what ablating them does.

    Left: gradient x activation per latent (the off-topic circuit's members marked). Right:
    per restart, the change in the restart token's log-probability when the top latents are
    ablated, next to the mean over random draws of as many active latents.
    """
    if not report or not report.get("rows"):
        return empty_figure("Restart drivers", "No attribution for this run: `esr-lab detectors attribute`.")
    det = set(report.get("detectors") or [])
    top = report["top"]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.12,
                        subplot_titles=(f"Attribution to the restart token ({report['read_hook']})",
                                        "Change in log p(restart) when ablated"))
    labels = [f"#{t['latent']}" + (" (circuit)" if t["latent"] in det else "") for t in top]
    fig.add_trace(go.Bar(x=labels, y=[t["attribution"] for t in top], name="attribution",
                         marker_color=[palette.CIRCUIT if t["latent"] in det else palette.RESTART for t in top],
                         hovertemplate="%{x}: %{y:.4f}<extra></extra>"), row=1, col=1)
    rows = report["rows"]
    d_top = [r["logp_top_ablated"] - r["logp"] for r in rows]
    d_rand = [float(np.mean(r["logp_random_ablated"])) - r["logp"] if r["logp_random_ablated"] else None for r in rows]
    keys = [str(r["key"]) for r in rows]
    fig.add_trace(go.Box(y=d_top, name=f"top {len(top)}", boxpoints="all", jitter=0.4, marker_color=palette.RESTART,
                         text=keys, hovertemplate="%{text}: %{y:+.3f}<extra>top</extra>"), row=1, col=2)
    fig.add_trace(go.Box(y=[x for x in d_rand if x is not None], name=f"{len(top)} random", boxpoints="all",
                         jitter=0.4, marker_color=palette.LIGHT,
                         hovertemplate="%{y:+.3f}<extra>random</extra>"), row=1, col=2)
    fig.update_yaxes(title_text="mean gradient x activation", row=1, col=1)
    fig.update_yaxes(title_text="Δ log p (0 = no effect)", row=1, col=2)
    fig.update_layout(showlegend=False, height=380, margin=dict(t=50, l=50, r=20, b=60),
                      title=dict(text=f"{report['n_restarts']} restarts of {Path(str(report['run'])).name}",
                                 font=dict(size=13)))
    return fig
