"""Small escaped HTML badges for live events: the circuit crossing its threshold, a restart.

Stable hooks for tests and styling: class ``esr-badge`` plus ``esr-circuit`` or
``esr-restart``, ``data-kind`` ("circuit" / "restart") and ``data-token`` (token index); a
restart badge also carries its phrase in ``data-phrase``. Every value is escaped here.
"""

from __future__ import annotations

import html
from typing import Sequence

from esr_core.viz import palette

BADGE_STYLE = ("display:inline-block;border-radius:10px;padding:1px 8px;margin:2px 4px 2px 0;"
               "font-size:0.78em;font-weight:600;color:#fff;background:{bg}")


def badge(text: str, colour: str, css_class: str = "", **data: object) -> str:
    """One badge; ``data`` become escaped ``data-*`` attributes."""
    attrs = "".join(f' data-{k.replace("_", "-")}="{html.escape(str(v), quote=True)}"' for k, v in data.items())
    cls = f"esr-badge {css_class}".strip()
    return f'<span class="{cls}"{attrs} style="{BADGE_STYLE.format(bg=colour)}">{html.escape(text)}</span>'


def resistance_badges(name: str, crossing: int | None, restarts: Sequence[tuple[int, str]]) -> str:
    """The circuit-crossing badge (when it crossed) and one badge per restart phrase seen."""
    out = []
    if crossing is not None:
        out.append(badge(f"{name} active from token {crossing}", palette.CIRCUIT, "esr-circuit",
                         kind="circuit", token=crossing))
    for t, phrase in restarts:
        out.append(badge(f"restart at token {t}: “{phrase[:40]}”", palette.RESTART, "esr-restart",
                         kind="restart", token=t, phrase=phrase[:80]))
    return "".join(out)
