"""Latents over token position as a plotly figure (pure: data in, figure out).

One subplot row per *lane* ("latents", "groups", and later e.g. "circuit"), shared x axis.
Steered runs are solid, default runs dashed, a second model's steered run ("compare") dash-dotted,
same colour per latent. ``regions`` shade token
spans (prompt / off-topic / correction ...), ``markers`` annotate single tokens (restart phrases,
threshold crossings): the extension points the resistance replay uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from esr_core.viz.palette import LATENTS

PALETTE = LATENTS  # lines without a colour of their own never borrow a role colour (circuit, backtracking)
LABEL_ROW_PX = 17  # pixels per row of event labels above the plot
RUN_DASH = {"steered": "solid", "default": "dash", "compare": "dashdot"}  # one line style per run (and model)


@dataclass
class Series:
    name: str
    values: Sequence[float]
    run: str = "steered"  # "steered" (solid) | "default" (dashed) | "compare" (dash-dot) | other words solid
    colour: str | None = None
    lane: str = "latents"
    x0: int = 0  # token position of values[0]
    tokens: Sequence[str] | None = None  # hover labels
    threshold: float | None = None


@dataclass
class Region:
    start: int
    end: int
    label: str
    colour: str = "rgba(120,120,120,0.12)"


@dataclass
class Marker:
    index: int
    label: str
    colour: str = "#444"


def _clean(values) -> np.ndarray:
    a = np.asarray(list(values), dtype=float)
    a[~np.isfinite(a)] = np.nan
    return a


def timeline_figure(series: Sequence[Series], *, regions: Sequence[Any] = (), markers: Sequence[Any] = (),
                    selected: int | None = None, title: str | None = None, height_per_lane: int = 230):
    """Build the figure. ``regions`` items: Region or (start, end, label, colour); ``markers``: Marker or (i, label)."""
    import plotly.graph_objects as go  # heavy: plotly
    from plotly.subplots import make_subplots  # heavy: plotly

    lanes: list[str] = []
    for s in series:
        if s.lane not in lanes:
            lanes.append(s.lane)
    if not lanes:
        lanes = ["latents"]
    fig = make_subplots(rows=len(lanes), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[ln for ln in lanes])
    colours: dict[str, str] = {}
    for s in series:
        col = s.colour or colours.get(s.name) or PALETTE[len(colours) % len(PALETTE)]
        colours.setdefault(s.name, col)
        y = _clean(s.values)
        x = np.arange(len(y)) + int(s.x0)
        toks = list(s.tokens) if s.tokens is not None else [""] * len(y)
        toks = (toks + [""] * len(y))[: len(y)]
        row = lanes.index(s.lane) + 1
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers", name=f"{s.name} ({s.run})" if s.run else s.name,
            legendgroup=s.name, line=dict(color=col, dash=RUN_DASH.get(s.run, "solid"), width=2),
            marker=dict(size=4), customdata=[[s.run, int(xi), t] for xi, t in zip(x, toks)],
            hovertemplate="%{customdata[0]} token %{x} %{customdata[2]}<br>" + s.name.replace("%", "%%")
                          + " = %{y:.3g}<extra></extra>",
        ), row=row, col=1)
        if s.threshold is not None and math.isfinite(s.threshold):
            fig.add_hline(y=s.threshold, line=dict(color=col, dash="dot", width=1), row=row, col=1)
    labels: list[tuple[float, str, str]] = []
    for r in regions:
        r = r if isinstance(r, Region) else Region(*r)
        fig.add_vrect(x0=r.start - 0.5, x1=r.end - 0.5, fillcolor=r.colour, line_width=0, layer="below")
        labels.append((r.start - 0.5, r.label, "#444"))
    for m in markers:
        m = m if isinstance(m, Marker) else Marker(*m)
        fig.add_vline(x=m.index, line=dict(color=m.colour, dash="dot", width=1))
        labels.append((float(m.index), m.label, m.colour))
    n_x = max([len(s.values) + int(s.x0) for s in series] + [1])
    levels = label_levels([x for x, _, _ in labels], min_gap=max(4.0, 0.14 * n_x))
    for (x, text, colour), level in zip(labels, levels):
        if level < 0:
            continue
        fig.add_annotation(x=x, y=1.0, yshift=LABEL_ROW_PX * level + 20, xref="x", yref="paper", text=text,
                           showarrow=False, xanchor="left", yanchor="bottom", font=dict(size=10, color=colour),
                           bgcolor="rgba(255,255,255,0.8)")
    if selected is not None:
        fig.add_vline(x=selected, line=dict(color="black", width=2))
    n_rows = max(levels, default=-1) + 1 if labels else 0
    top = 44 + LABEL_ROW_PX * n_rows + (8 if n_rows else 0)
    fig.update_layout(height=max(260, height_per_lane * len(lanes)) + LABEL_ROW_PX * n_rows,
                      margin=dict(l=40, r=10, t=top, b=30), hovermode="closest",
                      # the title at the very top; the event labels in rows between it and the plot
                      title=dict(text=title, x=0.01, xanchor="left", y=1.0, yref="container", yanchor="top",
                                 pad=dict(t=8)) if title else None,
                      legend=dict(orientation="h", y=-0.15), clickmode="event+select")
    fig.update_xaxes(title_text="token position", row=len(lanes), col=1)
    return fig


def label_levels(xs: Sequence[float], min_gap: float, max_rows: int = 4) -> list[int]:
    """A row for each label so that labels in one row start at least ``min_gap`` apart
    (left to right, lowest free row first): labels never print over each other. A label that
    fits in none of ``max_rows`` rows gets -1 (its line is drawn, its text left out)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    last: list[float] = []  # per row, where its last label starts
    out = [-1] * len(xs)
    for i in order:
        row = next((k for k, x in enumerate(last) if xs[i] - x >= min_gap), len(last))
        if row >= max_rows:
            continue
        if row == len(last):
            last.append(xs[i])
        else:
            last[row] = xs[i]
        out[i] = row
    return out


def selected_point(event: Any) -> tuple[str, int] | None:
    """(run, token position) of the first selected point in a ``st.plotly_chart`` selection event."""
    if not event:
        return None
    sel = event.get("selection") if isinstance(event, dict) else getattr(event, "selection", None)
    if not sel:
        return None
    pts = sel.get("points") if isinstance(sel, dict) else getattr(sel, "points", None)
    if not pts:
        return None
    p = pts[0]
    cd = p.get("customdata")
    if isinstance(cd, (list, tuple)) and len(cd) >= 2:
        try:
            return str(cd[0]), int(cd[1])
        except (TypeError, ValueError):
            pass
    x = p.get("x")
    try:
        return "steered", int(round(float(x)))
    except (TypeError, ValueError):
        return None


def summarise(values: Sequence[float], default: Sequence[float] | None = None, threshold: float | None = None,
              ) -> dict[str, Any]:
    """Peak, where it peaks, first threshold crossing, area, and mean delta vs the default run."""
    y = _clean(values)
    out: dict[str, Any] = {"peak": None, "peak_at": None, "first_crossing": None, "area": 0.0, "delta_vs_default": None}
    if y.size and np.isfinite(y).any():
        out["peak"] = float(np.nanmax(y))
        out["peak_at"] = int(np.nanargmax(y))
        out["area"] = float(np.nansum(np.clip(y, 0, None)))
        if threshold is not None:
            above = np.where(y >= threshold)[0]
            out["first_crossing"] = int(above[0]) if above.size else None
    if default is not None:
        d = _clean(default)
        if d.size and y.size:
            out["delta_vs_default"] = float(np.nanmean(y) - np.nanmean(d))
    return out
