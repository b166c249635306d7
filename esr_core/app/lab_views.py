"""What the steering lab shows of a finished run, computed without streamlit.

The judge's attempts per run, the resistance trackers a run would have had while streaming,
the timeline series (one line per watched latent, one lane per group), the summary table
under the timeline and the selected token's top latents.
"""

from __future__ import annotations

from typing import Callable

from esr_core.app.live_run import token_values
from esr_core.app.run_record import RunRecord
from esr_core.errors import EsrError
from esr_core.judge.scoring import judge_response
from esr_core.latents.groups import LatentGroup
from esr_core.resistance.live import LiveResistance, judged_overlay
from esr_core.viz import palette
from esr_core.viz.timeline import Series, summarise

CIRCUIT_NAME, BACKTRACK_NAME = "resistance circuit", "backtracking"
MAX_LINES = 8


def circuit_of(groups: list[LatentGroup]) -> LatentGroup | None:
    return next((g for g in groups if g.name == CIRCUIT_NAME), None)


def judge_runs(rec: RunRecord, describe: Callable[[int], str]) -> tuple[dict[str, dict], str | None]:
    """Each run's judged attempts as token regions and the verdict; an error line if the judge failed."""
    distractor = next((describe(iv.latent) for iv in rec.spec.interventions if iv.mode == "add"), None)
    out: dict[str, dict] = {}
    try:
        for run, res in rec.results.items():
            if res.text.strip():
                out[run] = judged_overlay(judge_response(rec.spec.prompt, res.text, distractor), res.pieces)
    except EsrError as exc:
        return out, f"Judge unavailable: {exc}"
    return out, None


def resistance_trackers(rec: RunRecord) -> dict[str, LiveResistance]:
    """Per run, the live tracker replayed over the finished run (same crossing, same restarts)."""
    circuit = circuit_of(list(rec.groups))
    if circuit is None:
        return {}
    return {run: LiveResistance.replay(circuit, res.pieces, res.acts, res.watch) for run, res in rec.results.items()}


def timeline_series(rec: RunRecord) -> list[Series]:
    """A line per watched latent that is in no group (at most eight), a lane per group, per run."""
    groups = list(rec.groups)
    in_groups = {m for g in groups for m in g.members}
    lines = [i for i in rec.spec.watch if i not in in_groups][:MAX_LINES]
    circuit = circuit_of(groups)
    steered = {iv.latent for iv in rec.spec.interventions if iv.mode == "add"}
    # the steered latent is the distractor colour; the others never borrow a role colour
    colour = {i: palette.DISTRACTOR if i in steered else palette.latent_colour(k)
              for k, i in enumerate([j for j in lines if j not in steered])}
    colour.update({i: palette.DISTRACTOR for i in lines if i in steered})
    series = []
    for run, res in rec.results.items():
        for i in lines:
            p, v, _, _ = token_values(res, latent=i)
            name = f"#{i} steered latent" if i in steered else f"#{i}"
            series.append(Series(name=name, values=v, run=run, tokens=p, colour=colour[i]))
        for g in groups:
            p, v, _, _ = token_values(res, group=g)
            thr = circuit.threshold_value() if g is circuit else None
            series.append(Series(name=g.name, values=v, run=run, colour=g.colour, lane="groups", tokens=p,
                                 threshold=thr))
    return series


def summary_rows(series: list[Series], trackers: dict[str, LiveResistance]) -> list[dict]:
    """Peak, first crossing, area and the difference to the default run, per steered series."""
    rows = []
    for s in series:
        if s.run not in ("steered", "compare"):
            continue
        dflt = next((x.values for x in series if x.name == s.name and x.run == "default"), None)
        sm = summarise(s.values, dflt, threshold=s.threshold)
        if s.name == CIRCUIT_NAME and trackers.get(s.run) is not None:
            sm["first_crossing"] = trackers[s.run].crossing  # smoothed, like the live badge
        rows.append({"series": s.name if s.run == "steered" else f"{s.name} (compare)", **sm})
    return rows


def top_latents_at(rec: RunRecord, run: str, k: int, describe: Callable[[int], str]) -> tuple[str, list[dict]]:
    """The token at position ``k`` of ``run`` and its top latents with their descriptions."""
    r = rec.results[run]
    if not r.pieces:
        return "", []
    k = min(max(int(k), 0), len(r.pieces) - 1)
    tops = r.top[k] if k < len(r.top) else []
    return r.pieces[k], [{"latent": int(i), "value": round(float(v), 3), "description": describe(int(i))}
                         for i, v in tops]
