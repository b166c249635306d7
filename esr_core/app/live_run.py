"""A run as it streams and once it is done: the live record, and per-token values for the views.

:class:`LiveRun` folds the engine's events into text as they arrive and into a
:class:`~esr_core.app.run_record.RunRecord` at any moment (a stopped run keeps every token);
the functions below give heatmaps and lanes their values, a group's members each on their own
scale.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from esr_core.app.run_record import RunRecord
from esr_core.latents.group_scales import (
    SCALE_SOURCES,
    catalog_scales,
    normalised_lane,
    observed_scales,
    resolve_scales,
)
from esr_core.latents.groups import LatentGroup
from esr_core.steering.compare import collect_all
from esr_core.steering.spec import GenerationSpec, PromptReadout, RunDone, RunResult, TokenEvent


@dataclass
class LiveRun:
    """Folds streamed events into per-run text as they arrive; survives a rerun in session state.

    Once :meth:`end` closes it, later events are ignored: after a Stop, Streamlit starts the next
    script run at once while the old one may still be producing a token, so the record filed and
    the counts shown must come from one closed state."""
    spec: GenerationSpec
    model: str
    sae: str
    groups: list[LatentGroup] = field(default_factory=list)
    events: list = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    n_tokens: dict[str, int] = field(default_factory=dict)
    done: dict[str, str] = field(default_factory=dict)
    rendered_prompt: str = ""
    status: str = "running"
    compare_model: str = ""  # a second model streaming the same steering as run "compare"
    read_sae: str | None = None  # the readout SAE's source when it is not the steering SAE
    dtype: str = "float32"  # the engine's weights dtype, recorded with the run
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, ev) -> str | None:
        """Record one event; returns the run it belongs to (None once the run is closed)."""
        with self._lock:
            if self.status != "running":
                return None
            return self._add(ev)

    def end(self, status: str) -> RunRecord | None:
        """Close the run as ``status`` ("done", "stopped", "failed") and return its record; None
        when another script run closed it first."""
        with self._lock:
            if self.status != "running":
                return None
            self.status = status
            return self.record(status)

    def _add(self, ev) -> str | None:
        self.events.append(ev)
        if isinstance(ev, PromptReadout):
            if ev.run != "compare":
                self.rendered_prompt = ev.rendered_prompt
            return ev.run
        if isinstance(ev, TokenEvent):
            self.texts[ev.run] = self.texts.get(ev.run, "") + (ev.text or "")
            self.n_tokens[ev.run] = self.n_tokens.get(ev.run, 0) + 1
            return ev.run
        if isinstance(ev, RunDone):
            self.texts[ev.run] = ev.text
            self.done[ev.run] = ev.stop_reason
            return ev.run
        return None

    def record(self, status: str | None = None) -> RunRecord:
        """The run so far as a RunRecord (a stopped run keeps every token it produced)."""
        st = status or self.status
        res = collect_all(list(self.events), self.spec)
        for run, r in res.items():
            if not r.text and r.pieces:
                r.text = "".join(r.pieces)
            if not r.stop_reason:
                r.stop_reason = "cancelled" if st == "stopped" else ""
        return RunRecord(spec=self.spec, model=self.model, sae=self.sae, results=res,
                         rendered_prompt=self.rendered_prompt, groups=list(self.groups), status=st,
                         compare_model=self.compare_model if "compare" in res else "", read_sae=self.read_sae,
                         dtype=self.dtype)


# ------------------------------------------------------------------ views of a finished run
def _run_tokens(result: RunResult, include_prompt: bool) -> tuple[list[str], np.ndarray, list[bool], list]:
    """Pieces, watched activations [T, n_watch], special flags and top lists, prompt first if asked."""
    pieces, special, tops = list(result.pieces), list(result.special), list(result.top)
    acts = result.acts if result.acts is not None else np.zeros((len(pieces), len(result.watch)))
    if include_prompt and result.prompt is not None:
        p = result.prompt
        pieces = list(p.tokens) + pieces
        special = [False] * len(p.tokens) + special
        tops = list(p.top) + tops
        acts = np.concatenate([np.asarray(p.acts).reshape(-1, len(result.watch)), acts], axis=0) if len(
            result.watch) else np.zeros((len(pieces), 0))
    return pieces, acts, special, tops


def token_values(result: RunResult, latent: int | None = None, group: LatentGroup | None = None,
                 how: str = "sum", include_prompt: bool = False) -> tuple[list[str], list[float], list[bool], list]:
    """Pieces, values, special flags and top lists of one run, for a latent or a group."""
    pieces, acts, special, tops = _run_tokens(result, include_prompt)
    if group is not None:
        vals = group.lane(acts, result.watch, how) if all(m in result.watch for m in group.members) else \
            group.lane_from_tops(tops, how)
    elif latent is not None and latent in result.watch:
        vals = np.asarray(acts)[:, result.watch.index(latent)]
    elif latent is not None:
        vals = np.array([dict(t).get(latent, 0.0) for t in tops])
    else:
        vals = np.zeros(len(pieces))
    return pieces, [float(v) for v in vals], special, tops


def group_member_values(result: RunResult, group: LatentGroup, include_prompt: bool = False,
                        ) -> tuple[list[str], np.ndarray, list[bool], list]:
    """Pieces, the members' activations [T, n_members], special flags and top lists of one run."""
    pieces, acts, special, tops = _run_tokens(result, include_prompt)
    if all(m in result.watch for m in group.members):
        m = group.member_matrix(acts, result.watch)
    else:
        m = group.member_matrix_from_tops(tops)
    return pieces, m, special, tops


def scale_note(group: LatentGroup, sources: Sequence[str]) -> str:
    """How each member was scaled, in words: "each latent ÷ its catalog max" (or the mix)."""
    kinds = list(dict.fromkeys(sources))
    if len(kinds) == 1:
        return f"each latent ÷ {SCALE_SOURCES.get(kinds[0], kinds[0])}"
    parts = []
    for k in kinds:
        ids = [f"#{m}" for m, s in zip(group.members, sources) if s == k]
        more = f" +{len(ids) - 4}" if len(ids) > 4 else ""
        parts.append(f"{SCALE_SOURCES.get(k, k)} for {', '.join(ids[:4])}{more}")
    return "each latent ÷ " + "; ".join(parts)


def group_heatmap_values(results: dict[str, RunResult], group: LatentGroup, catalog=None, normalise: bool = True,
                         include_prompt: bool = False, how: str = "sum",
                         ) -> tuple[dict[str, tuple[list[str], list[float], list[bool], list]], str]:
    """Heatmap values of a group for every run shown together, and a note on the scale.

    ``normalise``: each member is divided by its own scale (its max activation in ``catalog``;
    where the catalog lacks it, the max seen in these runs, position 0 and special tokens
    excluded) before the weighted sum, so no single latent's raw units dominate the colour.
    Otherwise the raw weighted sum (one shared raw scale)."""
    mats = {run: group_member_values(res, group, include_prompt) for run, res in results.items()}
    if not normalise:
        w = np.asarray(group.weights, dtype=float)
        views = {}
        for run, (p, m, sp, t) in mats.items():
            v = np.where(np.isfinite(m), m, 0.0) @ w
            if how == "mean":
                v = v / max(float(np.sum(np.abs(w))), 1e-12)
            views[run] = (p, [float(x) for x in v], sp, t)
        return views, "raw weighted sum"
    seen = np.zeros(len(group.members))
    for p, m, sp, _ in mats.values():
        mask = [not s for s in sp]
        if mask:
            mask[0] = False if include_prompt else mask[0]
        if m.shape[0]:
            seen = np.maximum(seen, observed_scales(m, mask))
    own = catalog_scales(catalog, group.members)
    _, sources = resolve_scales(own, list(seen), len(group.members))
    views = {run: (p, [float(x) for x in normalised_lane(m, group.weights, own, list(seen), how)], sp, t)
             for run, (p, m, sp, t) in mats.items()}
    return views, scale_note(group, sources)


def normalised_member_series(member_acts, group: LatentGroup, catalog=None, special: Sequence[bool] | None = None,
                             skip_first: bool = True, how: str = "sum") -> tuple[np.ndarray, str]:
    """One sequence's group values with each member ÷ its own scale (catalog max, else its max
    here outside position 0 and special tokens), and the note saying so."""
    m = np.asarray(member_acts, dtype=float).reshape(-1, len(group.members))
    mask = [not bool(x) for x in (special or [False] * m.shape[0])]
    mask = (mask + [True] * m.shape[0])[: m.shape[0]]
    if skip_first and mask:
        mask[0] = False
    seen = observed_scales(m, mask)
    own = catalog_scales(catalog, group.members)
    _, sources = resolve_scales(own, list(seen), len(group.members))
    return normalised_lane(m, group.weights, own, list(seen), how), scale_note(group, sources)
