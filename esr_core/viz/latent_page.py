"""A latent's feature page as pictures: token effects, the activation histogram, neighbours.

Researchers compare these with SAEDashboard and Neuronpedia, so the conventions follow
theirs: every token effect carries its value, tokens show their leading spaces and newlines,
the histogram covers exactly the range the latent fires in, and neighbours carry descriptions.
Token strings are model vocabulary and catalog text: escaped here.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

from esr_core.viz.token_heatmap import render_heatmap

SPACE_GLYPH = "\u2423"  # ␣
NEWLINE_GLYPH = "\u21b5"  # ↵
TAB_GLYPH = "\u21e5"  # ⇥
EMPTY_GLYPH = "\u2205"  # ∅
PROMOTED_COLOUR = "#0072B2"
SUPPRESSED_COLOUR = "#D55E00"
HIST_COLOUR = "#D55E00"


def visible_token(s: str) -> str:
    """A token as it reads in a vocabulary list: ' Sea' -> '␣Sea', '\\n' -> '↵', '' -> '∅'."""
    if s == "":
        return EMPTY_GLYPH
    return s.replace(" ", SPACE_GLYPH).replace("\n", NEWLINE_GLYPH).replace("\t", TAB_GLYPH)


def token_effects_html(rows: Sequence[Mapping], kind: str, n: int = 10, unit: str = "nats") -> str:
    """Promoted or suppressed tokens, each with its signed value, as a two-column list."""
    if not rows:
        return '<div class="esr-logits" style="color:#888">—</div>'
    colour = PROMOTED_COLOUR if kind == "promoted" else SUPPRESSED_COLOUR
    out = [f'<div class="esr-logits" data-kind="{html.escape(kind)}" style="font-size:0.88em;line-height:1.7">']
    for r in list(rows)[:n]:
        tok = str(r.get("token", ""))
        v = float(r.get("logit", 0.0))
        out.append(
            f'<div class="esr-logit" data-token="{html.escape(tok, quote=True)}" data-v="{v:.4g}" '
            'style="display:flex;justify-content:space-between;gap:8px">'
            f'<code style="white-space:pre">{html.escape(visible_token(tok))}</code>'
            f'<span style="color:{colour};font-variant-numeric:tabular-nums">{v:+.2f}</span></div>')
    out.append(f'<div style="color:#888;font-size:0.85em">{html.escape(unit)}</div></div>')
    return "".join(out)


def histogram_figure(hist: Mapping | None, max_act: float | None = None, marker: float | None = None,
                     height: int = 220) -> go.Figure:
    """Bars for the nonzero-activation histogram: empty bins dropped, x from 0 to the maximum.

    The catalog's bins are log-spaced and wider than the range a latent uses, so without this
    the axis runs far past the largest activation. Hover gives each bin's range and count.
    """
    fig = go.Figure()
    edges = list((hist or {}).get("edges") or [])
    counts = list((hist or {}).get("counts") or [])
    kept = [(a, b, c) for a, b, c in zip(edges[:-1], edges[1:], counts) if c > 0]
    if max_act and max_act > 0:  # the bin holding the maximum ends past it: clip it there
        kept = [(a, min(b, float(max_act)), c) for a, b, c in kept if a < max_act]
        top = float(max_act)
    else:
        top = max([b for _, b, _ in kept], default=0.0)
    if marker is not None and math.isfinite(marker):
        top = max(top, float(marker))
    if not kept:
        fig.add_annotation(text="no nonzero activations", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    else:
        fig.add_trace(go.Bar(
            x=[(a + b) / 2 for a, b, _ in kept], y=[c for _, _, c in kept], width=[b - a for a, b, _ in kept],
            marker_color=HIST_COLOUR, customdata=[[a, b] for a, b, _ in kept],
            hovertemplate="activation %{customdata[0]:.3g}–%{customdata[1]:.3g}: %{y} tokens<extra></extra>"))
    if marker is not None and math.isfinite(marker):
        fig.add_vline(x=marker, line=dict(color="black", dash="dash"), annotation_text="your text")
    fig.update_layout(height=height, margin=dict(l=30, r=10, t=30, b=30), title="Activation histogram (nonzero)",
                      xaxis_title="activation", yaxis_title="tokens", bargap=0.05, showlegend=False)
    if top > 0:
        fig.update_xaxes(range=[0, top * 1.03])
    return fig


def neighbours_html(neighbours: Sequence[Mapping], describe=None) -> str:
    """Nearest latents by decoder cosine, most similar first, each with its description."""
    rows = sorted(neighbours, key=lambda r: -float(r.get("cosine", 0.0)))
    if not rows:
        return '<div class="esr-neighbours" style="color:#888">—</div>'
    out = ['<table class="esr-neighbours" style="font-size:0.88em;border-collapse:collapse;width:100%">',
           '<tr style="color:#777;text-align:left"><th>latent</th><th>cosine</th><th>description</th></tr>']
    for r in rows:
        i = int(r["latent"])
        desc = describe(i) if describe else str(r.get("description") or "")
        out.append(f'<tr class="esr-neighbour" data-latent="{i}"><td>#{i}</td>'
                   f'<td style="font-variant-numeric:tabular-nums">{float(r.get("cosine", 0.0)):.2f}</td>'
                   f'<td>{html.escape(desc)}</td></tr>')
    out.append("</table>")
    return "".join(out)


def contexts_html(contexts: Sequence[Mapping], latent: int, max_act: float | None, colour: str = HIST_COLOUR,
                  n: int = 8) -> str:
    """Contexts, strongest first, each led by its peak activation and share of the maximum."""
    rows = sorted(contexts, key=lambda c: -float(c.get("max_act", 0.0)))[:n]
    if not rows:
        return '<div class="esr-contexts" style="color:#888">none in this band</div>'
    out = ['<div class="esr-contexts">']
    for c in rows:
        v = float(c.get("max_act", 0.0))
        share = f" · {v / max_act:.0%}" if max_act else ""
        out.append(f'<div class="esr-context" data-v="{v:.4g}" style="display:flex;gap:8px;align-items:baseline">'
                   f'<span style="min-width:78px;color:#555;font-size:0.8em;font-variant-numeric:tabular-nums">'
                   f'{v:.3g}{share}</span><div style="flex:1">')
        out.append(render_heatmap(c["tokens"], c["acts"], label=f"#{latent}", colour=colour, vmax=max_act or None,
                                  skip_first=False, legend=False, selected=c.get("peak_index")))
        out.append("</div></div>")
    out.append("</div>")
    return "".join(out)
