"""The steering lab's small HTML pieces: a streaming answer card, the resistance line of a run,
the verdict, the selected token. Every value that comes from the model or a file is escaped.

The class names and ``data-*`` attributes are stable hooks (browser tests and styling read them).
"""

from __future__ import annotations

import html
from typing import Sequence

from esr_core.viz import palette


def _attr(value) -> str:
    return html.escape(str(value), quote=True)


def live_card(run: str, text: str, n: int, status: str, badges: str = "", title: str = "") -> str:
    """One streaming answer; ``badges`` is pre-escaped HTML (:mod:`esr_core.viz.badges`);
    ``title`` names the run on screen (default: the run's name)."""
    colour = palette.RUNS.get(run, palette.NEUTRAL)
    return (f'<div class="esr-live" data-run="{_attr(run)}" data-n="{int(n)}" data-status="{_attr(status)}" '
            f'style="border:1px solid #ddd;border-radius:6px;padding:8px;min-height:4em">'
            f'<div style="font-size:0.8em;color:#666"><b style="color:{colour}">{html.escape(title or run)}</b> · '
            f'<span class="esr-n">{int(n)}</span> tokens · {html.escape(status)}</div>'
            f'<div class="esr-badges" data-run="{_attr(run)}">{badges}</div>'
            f'<div style="white-space:pre-wrap">{html.escape(text)}</div></div>')


def resistance_line(run: str, crossing: int | None, restart_tokens: Sequence[int], badges: str) -> str:
    """What the circuit and the restart detector saw in one finished run (badges pre-escaped)."""
    cross = "" if crossing is None else int(crossing)
    return (f'<div class="esr-resistance" data-run="{_attr(run)}" data-crossing="{cross}" '
            f'data-restarts="{",".join(str(int(t)) for t in restart_tokens)}" style="font-size:0.85em">'
            f'<b>{html.escape(run)}</b> · resistance: {badges or "no circuit crossing, no restart phrase"}</div>')


def verdict_line(verdict: str, label: str, scores: Sequence[float], run: str = "steered") -> str:
    """The judge's verdict on a run with its attempt scores."""
    sc = " → ".join(f"{float(x):.0f}" for x in scores if x is not None) or "—"
    return (f'<div class="esr-verdict" data-verdict="{_attr(verdict)}"><b>Verdict ({html.escape(run)} run):</b> '
            f'{html.escape(label)} · attempt scores {html.escape(sc)} · offline judge</div>')


def selected_token(run: str, index: int, piece: str, latents: Sequence[int]) -> str:
    """The header of the selected-token panel (its top latents follow as a table)."""
    return (f'<div class="esr-selected-token" data-run="{_attr(run)}" data-index="{int(index)}" '
            f'data-latents="{",".join(str(int(i)) for i in latents)}">Top latents at token <b>{int(index)}</b> '
            f'<code>{html.escape(repr(piece))}</code> of the {html.escape(run)} run</div>')


def iv_chip(label: str, description: str) -> str:
    """One intervention in the form: its label (which always names its unit) and the latent's description."""
    return (f'<span class="esr-iv-chip"><code>{html.escape(label)}</code></span> · '
            f'<span style="color:#555">{html.escape(description)}</span>')


def run_view(run_id: str, prompt: str, model: str, n_steered: int, status: str, steered: bool) -> str:
    """An invisible marker of the run the results panel shows (stable hooks for tests and links)."""
    return (f'<div class="esr-run-view" data-id="{_attr(run_id)}" data-prompt="{_attr(prompt)}" '
            f'data-model="{_attr(model)}" data-n-steered="{int(n_steered)}" data-status="{_attr(status)}" '
            f'data-steered="{"true" if steered else "false"}" style="display:none"></div>')


HIDE_STREAMLIT_STOP = ("<style>[data-testid='stStatusWidget'] button{display:none !important}</style>")
