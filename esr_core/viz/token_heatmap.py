"""Token heatmaps as HTML: one hue per latent or group, opacity on a sqrt or log scale.

Model output is untrusted text, so every token (and every tooltip) is HTML-escaped here,
in one place. Position 0 (the attention sink) and special tokens never set the colour scale.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

SCALES = ("sqrt", "log", "linear")
NEWLINE_GLYPH = "\u21b5"  # ↵
NEG_COLOUR = "#1f77b4"


def _rgb(colour: str) -> tuple[int, int, int]:
    c = colour.lstrip("#")
    if len(c) == 3:
        c = "".join(ch * 2 for ch in c)
    try:
        return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)
    except (ValueError, IndexError):
        return 214, 39, 40


def _finite(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


def scale_max(values: Sequence[float], special: Sequence[bool] | None = None, skip_first: bool = True) -> float:
    """The colour-scale maximum: largest |value| outside position 0 and special tokens."""
    best = 0.0
    for i, v in enumerate(values):
        if (skip_first and i == 0) or (special is not None and i < len(special) and special[i]):
            continue
        best = max(best, abs(_finite(v)))
    return best


def opacity(value: float, vmax: float, scale: str = "sqrt") -> float:
    """Map |value| in [0, vmax] to [0, 1]; sqrt and log keep weak activations visible."""
    if vmax <= 0:
        return 0.0
    x = min(abs(_finite(value)) / vmax, 1.0)
    if scale == "sqrt":
        return math.sqrt(x)
    if scale == "log":
        return math.log1p(99.0 * x) / math.log(100.0)
    return x


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def legend_html(label: str, colour: str, vmax: float, scale: str) -> str:
    r, g, b = _rgb(colour)
    return (
        '<div class="esr-legend" style="display:flex;flex-wrap:wrap;align-items:center;gap:6px;font-size:0.8em;'
        'margin:2px 0 6px 0">'
        f'<span>{html.escape(label)}</span><span>0</span>'
        f'<span style="display:inline-block;width:120px;height:10px;border:1px solid #ccc;'
        f'background:linear-gradient(to right, rgba({r},{g},{b},0), rgba({r},{g},{b},1))"></span>'
        f'<span>{_fmt(vmax)}</span><span style="color:#888">({html.escape(scale)} opacity; position 0 and special '
        'tokens excluded from the scale)</span></div>'
    )


def render_heatmap(
    pieces: Sequence[str],
    values: Sequence[float],
    *,
    special: Sequence[bool] | None = None,
    tops: Sequence[Sequence[tuple[int, float]]] | None = None,
    label: str = "",
    colour: str = "#d62728",
    scale: str = "sqrt",
    vmax: float | None = None,
    skip_first: bool = True,
    hide_special: bool = False,
    selected: int | None = None,
    offset: int = 0,
    legend: bool = True,
    describe=None,
) -> str:
    """HTML for ``pieces`` tinted by ``values``; tooltips give the value and the top latents.

    ``offset`` is added to the displayed token index (so generated tokens can be numbered after
    the prompt). ``describe(latent) -> str`` adds short descriptions to the tooltip's top latents.
    """
    if scale not in SCALES:
        scale = "sqrt"
    n = len(pieces)
    vals = [_finite(values[i]) if i < len(values) else 0.0 for i in range(n)]
    spec_flags = [bool(special[i]) if special is not None and i < len(special) else False for i in range(n)]
    vm = vmax if vmax is not None and vmax > 0 else scale_max(vals, spec_flags, skip_first)
    r, g, b = _rgb(colour)
    nr, ng, nb = _rgb(NEG_COLOUR)
    out = []
    if legend:
        out.append(legend_html(label or "activation", colour, vm, scale))
    out.append('<div class="esr-heatmap" style="font-family:ui-monospace,monospace;font-size:0.9em;'
               'line-height:1.9;white-space:pre-wrap;word-break:break-word">')
    for i, piece in enumerate(pieces):
        if hide_special and spec_flags[i]:
            continue
        v = vals[i]
        a = opacity(v, vm, scale)
        if skip_first and i == 0 and offset == 0:
            a = min(a, 0.15)
        cr, cg, cb = (r, g, b) if v >= 0 else (nr, ng, nb)
        tip = [f"#{i + offset} {piece!r}", f"{label or 'value'} = {_fmt(v)}"]
        if tops is not None and i < len(tops) and tops[i]:
            tl = []
            for lat, val in list(tops[i])[:5]:
                d = describe(lat) if describe else ""
                tl.append(f"  #{lat}: {_fmt(val)}" + (f" ({d[:40]})" if d else ""))
            tip.append("top latents:\n" + "\n".join(tl))
        if spec_flags[i]:
            tip.append("special token")
        text = str(piece)
        shown = html.escape(text.replace("\n", NEWLINE_GLYPH), quote=True)
        if text == "":
            shown = "\u2205" if spec_flags[i] else ""
        style = [f"background:rgba({cr},{cg},{cb},{a:.3f})", "border-radius:3px", "padding:1px 0"]
        if a > 0.6:
            style.append("color:white")
        if spec_flags[i]:
            style.append("outline:1px dashed #888;color:#666;font-style:italic")
        if selected is not None and i + offset == selected:
            style.append("outline:2px solid #000")
        cls = "esr-tok esr-special" if spec_flags[i] else "esr-tok"
        out.append(
            f'<span class="{cls}" data-i="{i + offset}" data-v="{_fmt(v)}" '
            f'title="{html.escape(chr(10).join(tip), quote=True)}" style="{";".join(style)}">{shown}</span>'
        )
        if "\n" in text:
            out.append("<br>" * text.count("\n"))
    out.append("</div>")
    return "".join(out)
