"""Resistance made visible while a steered answer streams, and judged once it is done.

``LiveResistance`` follows one run token by token: the resistance circuit's activity (group
sum, EMA-smoothed as in the paper's per-token view), the first token where it crosses its
threshold, and the tokens where restart language ("wait, that's not right", "let me try
again", ...) appears. ``judged_overlay`` turns the judge's attempts of a finished answer into
token regions with scores and the verdict. Both return plain data and escaped HTML; no
streamlit here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from esr_core.judge.restart_phrases import find_restart_phrases
from esr_core.judge.scoring import verdict
from esr_core.latents.groups import LatentGroup
from esr_core.viz import palette
from esr_core.viz.badges import resistance_badges


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
    def for_group(cls, group: LatentGroup, threshold: float | None = None, ema_alpha: float = 0.5) -> "LiveResistance":
        thr = (group.threshold_value() or 0.0) if threshold is None else float(threshold)
        return cls(members=list(group.members), weights=list(group.weights), threshold=thr, ema_alpha=ema_alpha,
                   name=group.name)

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
        """Escaped badges: circuit crossed (and where), restart phrases seen (:mod:`esr_core.viz.badges`)."""
        return resistance_badges(self.name, self.crossing, [(t, key.split(":", 1)[1]) for t, key in self.restarts])


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
    starts = token_starts(pieces)
    regions, markers = [], []
    attempts = judgement.get("attempts") or []
    for k, a in enumerate(attempts):
        s = _char_to_token(starts, int(a.get("start_char", 0)))
        e = _char_to_token(starts, max(int(a.get("end_char", 0)) - 1, 0)) + 1
        regions.append((s, e, f"attempt {k + 1}: {float(a.get('score', 0)):.0f}/100",
                        palette.ATTEMPT_FILLS[k % len(palette.ATTEMPT_FILLS)]))
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
