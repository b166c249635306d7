"""The correction overlay's maths and its saved file: alignment, region ratios, one paragraph.

Pure functions (numpy) over per-episode series, plus reading ``overlay.json`` and describing
it in words; the computation that replays episodes through the model is
:mod:`esr_core.experiments.overlay`. See that module for the method (ESR_METHOD.md sec. 6).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from esr_core.errors import BadInput, EsrError
from esr_core.io import read_json_or
from esr_core.resistance.signals import ema

OVERLAY_FILE = "overlay.json"
PARTIAL_FILE = "overlay.partial.jsonl"
FORMAT = "esr-correction-overlay-v1"
SIGNALS = ("circuit", "backtracking", "distractor")
SOURCES = ("trials", "synthetic")
SOURCE_LABELS = {"trials": "multi-attempt trials of the run", "synthetic": "synthetic recoveries"}
PAPER = {"off_topic": 4.4, "after_correction": 2.1, "n_episodes": 146}


def align_at_events(arrays: Sequence[Sequence[float]], event_index: Sequence[int],
                    before: int = 20, after: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-token arrays aligned so each episode's event sits at offset 0.

    Returns (offsets, matrix) with offsets = -before..after and matrix of shape
    (episodes, before + after + 1), NaN where an episode has no token at that offset.
    """
    if len(arrays) != len(event_index):
        raise EsrError(f"{len(arrays)} activity arrays but {len(event_index)} correction indices")
    offsets = np.arange(-before, after + 1)
    mat = np.full((len(arrays), offsets.size), np.nan)
    for i, (arr, ev) in enumerate(zip(arrays, event_index)):
        a = np.asarray(arr, dtype=float).ravel()
        if ev is None or not (0 <= int(ev) < a.size):
            continue  # no correction point in this episode: leave it out
        pos = int(ev) + offsets
        ok = (pos >= 0) & (pos < a.size)
        mat[i, ok] = a[pos[ok]]
    return offsets, mat


def clean(x, digits: int = 5):
    """JSON-safe rounded float (None for NaN/inf)."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def aligned_stats(series: Sequence[Sequence[float]], events: Sequence[int | None], window: int | tuple[int, int]
                  ) -> dict:
    """Align each episode's series at its event token; per-offset mean, standard error and n.

    Offsets run ``-before..after``; an episode contributes at an offset only where it has a
    token (NaN padding otherwise), so ``n`` may differ between offsets. SE is the sample SD
    over sqrt(n) (None where n < 2); the mean is None where n = 0.
    """
    before, after = (int(window), int(window)) if isinstance(window, (int, np.integer)) else map(int, window)
    offsets, mat = align_at_events(list(series), list(events), before, after)
    n = np.sum(np.isfinite(mat), axis=0)
    mean = np.full(offsets.size, np.nan)
    se = np.full(offsets.size, np.nan)
    for j in range(offsets.size):
        col = mat[:, j][np.isfinite(mat[:, j])]
        if col.size:
            mean[j] = col.mean()
        if col.size > 1:
            se[j] = col.std(ddof=1) / math.sqrt(col.size)
    return {"offsets": offsets.astype(int).tolist(), "mean": [clean(v) for v in mean],
            "se": [clean(v) for v in se], "n": n.astype(int).tolist()}


def region_mean(series: Sequence[float], start: int, end: int) -> float | None:
    """Mean of ``series[start:end]`` (None when the range is empty)."""
    a = np.asarray(series, dtype=float)
    s, e = max(int(start), 0), min(int(end), a.size)
    return float(a[s:e].mean()) if e > s else None


def mean_se(values: Sequence[float | None]) -> dict:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    return {"mean": clean(v.mean()) if v.size else None,
            "se": clean(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None, "n": int(v.size)}


def ratio(mean: float | None, baseline: float | None) -> float | None:
    if mean is None or baseline is None or not baseline > 0:
        return None
    return clean(mean / baseline, 4)


def episode_regions(ep: dict, name: str, alpha: float) -> dict:
    """Mean EMA activity of one episode per region: off-topic, correction phrase, after it."""
    s = ep.get(name)
    if s is None:
        return {}
    sm = ema(s, alpha)
    off = region_mean(sm, *ep["off"]) if ep.get("off_topic") else None
    return {"off_topic": off, "correction": region_mean(sm, ep["corr"], ep["corr_end"]),
            "after_correction": region_mean(sm, ep["corr_end"], len(sm))}


def summarise_source(episodes: list[dict], baseline: dict, window: int, alpha: float) -> dict:
    """Aligned arrays and region ratios of one source's episodes (raw per-token sums inside)."""
    signals, regions = {}, {}
    for name in SIGNALS:
        have = [e for e in episodes if e.get(name) is not None]
        if not have:
            continue
        signals[name] = aligned_stats([ema(e[name], alpha) for e in have], [e["corr"] for e in have], window)
        per = [episode_regions(e, name, alpha) for e in have]
        block = {}
        for reg in ("off_topic", "correction", "after_correction"):
            st = mean_se([p.get(reg) for p in per])
            base = baseline.get(name)
            st["ratio"] = ratio(st["mean"], base)
            st["ratio_se"] = clean(st["se"] / base, 4) if st["se"] is not None and base and base > 0 else None
            block[reg] = st
        regions[name] = block
    return {"signals": signals, "regions": regions}


# ----------------------------------------------------------------------------- text -> tokens


def locate_response(text: str, offsets: Sequence[tuple[int, int]], response: str) -> tuple[int, int, int]:
    """(char where ``response`` starts in ``text``, its first token, end token exclusive)."""
    base = text.rfind(response)  # the assistant turn comes last; only end-of-turn marks follow
    if base < 0 or not response:
        raise BadInput("The chat template changed the response text; char offsets cannot be mapped to tokens")
    end = base + len(response)
    n = len(offsets)
    first = next((t for t, (s, e) in enumerate(offsets) if e > s and e > base and s >= base - 1), n)
    last = next((t for t in range(first, n) if offsets[t][0] >= end), n)
    return base, first, last


def char_token(offsets: Sequence[tuple[int, int]], base: int, first: int, last: int, char: int) -> int:
    """Index (relative to ``first``) of the response token holding response char ``char``."""
    target = base + int(char)
    for t in range(first, last):
        s, e = offsets[t]
        if e > s and e > target:
            return t - first
    return max(last - first - 1, 0)


def span_tokens(offsets, base, first, last, a: int, b: int) -> tuple[int, int]:
    """Token range [start, end) (relative to ``first``) covering response chars [a, b)."""
    if b <= a:
        t = char_token(offsets, base, first, last, a)
        return t, t
    return char_token(offsets, base, first, last, a), char_token(offsets, base, first, last, b - 1) + 1


def overlay_path(folder: str | Path) -> Path:
    return Path(folder) / OVERLAY_FILE


def load_overlay(folder: str | Path) -> dict | None:
    """The saved overlay of a folder, or None when missing or unreadable."""
    d = read_json_or(overlay_path(folder))
    return d if isinstance(d, dict) and d.get("format") == FORMAT else None


def steering_word(eps: list[dict]) -> str:
    on = sum(bool(e.get("steering")) for e in eps)
    if not eps:
        return "n/a"
    return "on" if on == len(eps) else ("off" if on == 0 else f"mixed ({on} on, {len(eps) - on} off)")


def episode_brief(e: dict, alpha: float) -> dict:
    d = {"key": e["key"], "n_tokens": e["n"], "corr": e["corr"], "corr_end": e["corr_end"], "off": e["off"],
         "off_topic": e["off_topic"], "steering": e["steering"]}
    for k in ("condition", "scores", "restart", "circuit_ablated"):
        if k in e:
            d[k] = e[k]
    for name in SIGNALS:
        if e.get(name) is not None:
            d[name] = {k: clean(v, 4) for k, v in episode_regions(e, name, alpha).items()}
    return d


def _fmt_ratio(x) -> str:
    return "n/a" if x is None else f"{x:.1f}x"


def describe(overlay: dict | None) -> str:
    """One paragraph: per source the episode count and steering on/off, then the ratios."""
    if not overlay:
        return "No overlay computed yet."
    parts = []
    for s in SOURCES:
        b = (overlay.get("sources") or {}).get(s)
        if b is None:
            continue
        n = b.get("n_episodes", 0)
        txt = f"{SOURCE_LABELS[s].capitalize()}: {n} episode{'s' if n != 1 else ''}, steering {b.get('steering')}"
        r = (overlay.get("ratios") or {}).get(s, {}).get("circuit", {})
        if n and not (overlay.get("baseline") or {}).get("circuit"):
            txt += "; no circuit ratio (the circuit is silent on the on-topic answers, baseline 0)"
        elif n:
            txt += (f"; circuit {_fmt_ratio(r.get('off_topic'))} the on-topic baseline during off-topic text and "
                    f"{_fmt_ratio(r.get('after_correction'))} after the correction")
            rb = (overlay.get("ratios") or {}).get(s, {}).get("backtracking", {})
            if rb.get("after_correction") is not None or rb.get("off_topic") is not None:
                txt += (f" (backtracking {_fmt_ratio(rb.get('off_topic'))} / "
                        f"{_fmt_ratio(rb.get('after_correction'))})")
            if b.get("n_circuit_ablated"):
                txt += f"; the circuit was ablated (reads 0) in {b['n_circuit_ablated']} of them"
        parts.append(txt + ".")
    read = overlay.get("read_sae")
    if read:
        parts.append(f"Read from the readout SAE at {read.get('hook')} (steering at {overlay.get('hook')}); the "
                     "distractor's own activation is not shown, its id belongs to the steering SAE.")
    base = overlay.get("baseline") or {}
    parts.append(f"Baseline: {base.get('n_answers', 0)} unsteered on-topic answers. Paper "
                 f"({PAPER['n_episodes']} episodes, steering off): {PAPER['off_topic']}x and "
                 f"{PAPER['after_correction']}x.")
    return " ".join(parts)


