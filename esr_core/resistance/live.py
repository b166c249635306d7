"""Resistance made visible while a steered answer streams, and judged once it is done.

``LiveResistance`` follows one run token by token: the resistance circuit's activity (group
sum, EMA-smoothed as in the paper's per-token view), the first token where it crosses its
threshold, and the tokens where restart language ("wait, that's not right", "let me try
again", ...) appears. ``judged_overlay`` turns the judge's attempts of a finished answer into
token regions with scores and the verdict. Both return plain data and escaped HTML; no
streamlit here.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from esr_core.judge.restart_phrases import find_restart_phrases

BADGE_STYLE = ("display:inline-block;border-radius:10px;padding:1px 8px;margin:2px 4px 2px 0;"
               "font-size:0.78em;font-weight:600;color:#fff;background:{bg}")
CIRCUIT_COLOUR = "#D55E00"
RESTART_COLOUR = "#CC79A7"
ATTEMPT_COLOURS = ("rgba(213,94,0,0.13)", "rgba(0,158,115,0.15)", "rgba(0,114,178,0.13)", "rgba(230,159,0,0.15)")


def _group_fields(group) -> tuple[list[int], list[float], str]:
    if isinstance(group, dict):
        members = [int(m) for m in group.get("members", [])]
        weights = [float(w) for w in group.get("weights", [1.0] * len(members))]
        return members, weights, str(group.get("name", "group"))
    members = [int(m) for m in group.members]
    weights = [float(w) for w in (group.weights or [1.0] * len(members))]
    return members, weights, str(group.name)


def group_threshold(group, fallback: float = 0.0) -> float:
    """The alert threshold stored with a shipped group (detector search), else ``fallback``."""
    if isinstance(group, dict):
        raw = group.get("threshold")
    else:
        raw = getattr(group, "threshold", None) or (getattr(group, "extra", None) or {}).get("threshold")
    if isinstance(raw, dict):
        raw = raw.get("value")
    try:
        return float(raw) if raw is not None else fallback
    except (TypeError, ValueError):
        return fallback


@dataclass
class LiveResistance:
    """Per-run tracker fed with TokenEvents (their ``acts`` must include the circuit members)."""

    members: list[int]
    weights: list[float]
    threshold: float = 0.0
    ema_alpha: float = 0.5
    name: str = "resistance circuit"
    activity: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    crossing: int | None = None
    text: str = ""
    token_starts: list[int] = field(default_factory=list)
    restarts: list[tuple[int, str]] = field(default_factory=list)  # (token index, phrase)

    @classmethod
    def for_group(cls, group, threshold: float | None = None, ema_alpha: float = 0.5) -> "LiveResistance":
        members, weights, name = _group_fields(group)
        thr = group_threshold(group) if threshold is None else float(threshold)
        return cls(members=members, weights=weights, threshold=thr, ema_alpha=ema_alpha, name=name)

    @classmethod
    def replay(cls, group, pieces: Sequence[str], acts, watch: Sequence[int],
               threshold: float | None = None, ema_alpha: float = 0.5) -> "LiveResistance":
        """The tracker a finished (or stopped) run would have had while streaming: fed its
        generated ``pieces`` and watched activations ``acts`` [T, len(watch)] token by token."""
        t = cls.for_group(group, threshold=threshold, ema_alpha=ema_alpha)
        a = np.asarray(acts if acts is not None else [], dtype=float)
        a = a.reshape(-1, len(watch)) if len(watch) and a.size else np.zeros((len(pieces), len(watch)))
        cols = [int(w) for w in watch]
        for k, piece in enumerate(pieces):
            row = a[k] if k < len(a) else np.zeros(len(cols))
            t.update({c: float(v) for c, v in zip(cols, row) if np.isfinite(v)}, piece)
        return t

    def update(self, acts: dict[int, float], piece: str) -> None:
        raw = sum(w * float(acts.get(m, 0.0)) for m, w in zip(self.members, self.weights))
        prev = self.smoothed[-1] if self.smoothed else raw
        sm = self.ema_alpha * raw + (1 - self.ema_alpha) * prev
        self.activity.append(raw)
        self.smoothed.append(sm)
        if self.crossing is None and sm > self.threshold:
            self.crossing = len(self.smoothed) - 1
        self.token_starts.append(len(self.text))
        self.text += piece
        self._scan_restarts()

    def _scan_restarts(self) -> None:
        """Re-scan the text so far; a phrase that grows as tokens arrive keeps its first token."""
        by_start = {int(k.split(":", 1)[0]): n for n, (_, k) in enumerate(self.restarts)}
        for ph in find_restart_phrases(self.text):
            key = f"{ph.start_char}:{ph.text}"
            if ph.start_char in by_start:
                n = by_start[ph.start_char]
                self.restarts[n] = (self.restarts[n][0], key)
                continue
            tok = int(np.searchsorted(self.token_starts, ph.start_char, side="right") - 1)
            self.restarts.append((max(tok, 0), key))

    @property
    def restart_tokens(self) -> list[int]:
        return [t for t, _ in self.restarts]

    def badges_html(self) -> str:
        """Small escaped badges: circuit crossed (and where), restart phrases seen.

        Stable hooks for tests and styling: class ``esr-badge`` plus ``esr-circuit`` or
        ``esr-restart``, ``data-kind`` ("circuit" / "restart") and ``data-token`` (token index);
        a restart badge also carries its phrase in ``data-phrase`` (escaped)."""
        out = []
        if self.crossing is not None:
            out.append(f'<span class="esr-badge esr-circuit" data-kind="circuit" data-token="{self.crossing}" '
                       f'style="{BADGE_STYLE.format(bg=CIRCUIT_COLOUR)}">'
                       f'{html.escape(self.name)} active from token {self.crossing}</span>')
        for t, key in self.restarts:
            phrase = key.split(":", 1)[1]
            out.append(f'<span class="esr-badge esr-restart" data-kind="restart" data-token="{t}" '
                       f'data-phrase="{html.escape(phrase[:80], quote=True)}" '
                       f'style="{BADGE_STYLE.format(bg=RESTART_COLOUR)}">restart at token {t}: '
                       f'“{html.escape(phrase[:40])}”</span>')
        return "".join(out)


def _char_to_token(starts: Sequence[int], char: int) -> int:
    return max(int(np.searchsorted(list(starts), char, side="right") - 1), 0)


def token_starts(pieces: Sequence[str]) -> list[int]:
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p)
    return starts


def judged_overlay(judgement: dict, pieces: Sequence[str]) -> dict:
    """Token regions for each judged attempt (with its score) and restart markers, plus the verdict."""
    from esr_core.judge.scoring import verdict

    starts = token_starts(pieces)
    regions, markers = [], []
    attempts = judgement.get("attempts") or []
    for k, a in enumerate(attempts):
        s = _char_to_token(starts, int(a.get("start_char", 0)))
        e = _char_to_token(starts, max(int(a.get("end_char", 0)) - 1, 0)) + 1
        regions.append((s, e, f"attempt {k + 1}: {float(a.get('score', 0)):.0f}/100",
                        ATTEMPT_COLOURS[k % len(ATTEMPT_COLOURS)]))
    for ph in judgement.get("restart_phrases") or []:
        markers.append((_char_to_token(starts, int(ph.get("start_char", 0))), "restart"))
    v = verdict(judgement)
    return {"regions": regions, "markers": markers, "verdict": v, "scores": [a.get("score") for a in attempts],
            "label": VERDICT_LABELS.get(v, v)}


VERDICT_LABELS = {
    "none": "no scorable attempt (trial excluded)",
    "single": "single attempt: no restart",
    "multi": "multi-attempt: the model restarted, but did not do better",
    "esr": "ESR: the model restarted and its last attempt beats its first",
}
