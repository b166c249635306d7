"""Per-token view of a recovery episode: circuit activity, crossings, regions, verdict.

ESR_METHOD.md sec. 6 (arXiv 2602.06941): follow the off-topic detectors (and backtracking
latents) token by token over the regions prompt | off-topic | correction | on-topic, smooth
with an EMA (alpha 0.5), and compare each region with a baseline (the paper reports 4.4x during
off-topic content and 2.1x after the correction). Pure functions on arrays and groups: the
steering lab and the Resistance page both draw from them, the tests check them.
"""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np

from esr_core.errors import BadInput
from esr_core.judge.scoring import judge_response
from esr_core.latents.groups import LatentGroup
from esr_core.resistance.episodes import render_pair
from esr_core.resistance.signals import ema
from esr_core.viz import palette

REGION_LABELS = ("prompt", "off-topic", "correction", "on-topic")
ON_TOPIC_SCORE = 50.0  # an attempt scoring at least this is on-topic (judge scale 0-100)


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def member_matrix(z_or_acts, group: LatentGroup, columns: Sequence[int] | None = None) -> np.ndarray:
    """The members' activations [T, n_members] from a full SAE code or from watched columns.

    ``z_or_acts`` is either the full code [T, d_sae] (``columns`` None: column = latent id) or
    a readout of watched latents [T, n_watch] whose latent ids are ``columns``. A member that is
    not among the watched columns reads 0 (and is reported by :func:`missing_members`).
    """
    a = _as_array(z_or_acts)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise BadInput(f"Expected a [tokens, latents] array, got shape {a.shape}")
    members = [int(i) for i in group.members]
    out = np.zeros((a.shape[0], len(members)))
    if columns is None:
        for k, i in enumerate(members):
            if i >= a.shape[1]:
                raise BadInput(f"Latent {i} is outside the given code (width {a.shape[1]})")
            out[:, k] = a[:, i]
    else:
        pos = {int(c): j for j, c in enumerate(columns)}
        for k, i in enumerate(members):
            if i in pos:
                out[:, k] = a[:, pos[i]]
    return out


def missing_members(group: LatentGroup, columns: Sequence[int]) -> list[int]:
    cols = {int(c) for c in columns}
    return [int(i) for i in group.members if int(i) not in cols]


def circuit_activity(z_or_acts, group: LatentGroup, how: str = "sum", ema_alpha: float | None = 0.5,
                     columns: Sequence[int] | None = None) -> np.ndarray:
    """Weighted sum (or mean) of the group's members per token, EMA-smoothed (alpha None: raw)."""
    if how not in ("sum", "mean"):
        raise BadInput(f"how must be 'sum' or 'mean', got {how!r}")
    m = member_matrix(z_or_acts, group, columns)
    w = np.asarray(group.weights or [1.0] * m.shape[1], dtype=np.float64)
    if m.shape[1] == 0:
        raw = np.zeros(m.shape[0])
    else:
        raw = m @ w
        if how == "mean":
            raw = raw / max(float(np.sum(np.abs(w))), 1e-12)
    return ema(raw, ema_alpha) if ema_alpha else raw


def threshold_crossings(series, threshold: float) -> list[int]:
    """Indices where the series rises strictly above ``threshold`` (index 0 if it starts there).

    Strict, because a sparse (TopK) circuit's on-topic threshold is often exactly 0.
    """
    s = _as_array(series).ravel()
    if s.size == 0:
        return []
    above = s > float(threshold)
    out = [0] if above[0] else []
    out += [int(t) for t in np.where(above[1:] & ~above[:-1])[0] + 1]
    return out


def _token_char(offsets, t: int, base: int) -> tuple[int, int]:
    s, e = offsets[t]
    return int(s) - base, int(e) - base


def regions_from_judgement(judgement: dict, token_offsets: Sequence[tuple[int, int]], prompt_len: int,
                           response_start_char: int = 0, on_topic_score: float = ON_TOPIC_SCORE) -> list[dict]:
    """Token regions labelled prompt / off-topic / correction / on-topic from the judge's attempts.

    ``token_offsets`` are the char spans of every token of the sequence (prompt tokens first);
    the judge's char offsets are into the response, which starts at ``response_start_char`` of
    the same text. Tokens before ``prompt_len`` are the prompt. A response token overlapping a
    restart phrase is ``correction``; otherwise it takes the label of the attempt containing it
    (score >= ``on_topic_score``: on-topic, else off-topic); tokens between attempts (spaces,
    end-of-turn marks) keep the label before them. Returns contiguous spans
    ``[{"label", "start", "end"}]`` (token indices, end exclusive).
    """
    n = len(token_offsets)
    if not 0 <= prompt_len <= n:
        raise BadInput(f"prompt_len {prompt_len} is outside 0..{n}")
    attempts = list((judgement or {}).get("attempts") or [])
    restarts = list((judgement or {}).get("restart_phrases") or [])
    spans_att = []
    for k, a in enumerate(attempts):
        if a.get("start_char") is None or a.get("end_char") is None:
            raise BadInput("The judgement's attempts have no char offsets (start_char/end_char)")
        lab = "on-topic" if float(a.get("score", 0.0)) >= on_topic_score else "off-topic"
        spans_att.append((int(a["start_char"]), int(a["end_char"]), lab))
    spans_rs = sorted((int(r["start_char"]), int(r["end_char"])) for r in restarts
                      if r.get("start_char") is not None and r.get("end_char") is not None)
    # "Wait, that's not right. Let me get back to it": adjacent phrases are one correction
    merged: list[list[int]] = []
    for a, b in spans_rs:
        if merged and a - merged[-1][1] <= 3:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    spans_rs = [(a, b) for a, b in merged]
    labels = ["prompt"] * n
    prev = None
    for t in range(prompt_len, n):
        s, e = _token_char(token_offsets, t, response_start_char)
        lab = None
        if e > s and any(s < re_ and e > rs for rs, re_ in spans_rs):
            lab = "correction"
        elif e > s:
            for as_, ae, al in spans_att:
                if s < ae and e > as_:
                    lab = al
                    break
        if lab is None:
            lab = prev or (spans_att[0][2] if spans_att else "on-topic")
        labels[t] = lab
        prev = lab
    return labels_to_regions(labels)


def labels_to_regions(labels: Sequence[str]) -> list[dict]:
    out: list[dict] = []
    for t, lab in enumerate(labels):
        if out and out[-1]["label"] == lab and out[-1]["end"] == t:
            out[-1]["end"] = t + 1
        else:
            out.append({"label": lab, "start": t, "end": t + 1})
    return out


def region_labels(regions: Sequence[dict], n: int) -> list[str | None]:
    """Per-token labels from region spans (None where no region covers a token)."""
    out: list[str | None] = [None] * n
    for r in regions:
        for t in range(max(0, r["start"]), min(n, r["end"])):
            out[t] = r["label"]
    return out


def restart_markers(judgement: dict, token_offsets: Sequence[tuple[int, int]], prompt_len: int,
                    response_start_char: int = 0) -> list[dict]:
    """First token of each restart phrase: ``[{"token", "text"}]`` for event markers."""
    out = []
    for r in (judgement or {}).get("restart_phrases") or []:
        for t in range(prompt_len, len(token_offsets)):
            s, e = _token_char(token_offsets, t, response_start_char)
            if e > s and e > int(r["start_char"]) and s < int(r["end_char"]):
                out.append({"token": t, "text": str(r.get("text", ""))})
                break
    return out


def episode_summary(activity, regions: Sequence[dict], baseline: str = "on-topic", skip_first: bool = True,
                    baseline_value: float | None = None) -> dict:
    """Mean activity per region and its ratio to the baseline region (paper: 4.4x off-topic, 2.1x after).

    Position 0 (the attention sink) is left out when ``skip_first``. ``baseline_value`` replaces
    the baseline region's mean (e.g. the group's mean activity on on-topic answers when the
    detectors are silent on the prompt, as a TopK SAE's often are). Ratios are None where the
    baseline is 0 or the region is empty.
    """
    a = _as_array(activity).ravel()
    labels = region_labels(regions, len(a))
    if skip_first and len(labels):
        labels[0] = None
    out: dict = {"regions": {}, "baseline": baseline}
    for lab in REGION_LABELS:
        idx = [t for t, l in enumerate(labels) if l == lab]
        out["regions"][lab] = {"n_tokens": len(idx), "mean": float(np.mean(a[idx])) if idx else None,
                               "peak": float(np.max(a[idx])) if idx else None}
    base = baseline_value if baseline_value is not None else out["regions"].get(baseline, {}).get("mean")
    out["baseline_mean"] = base
    for lab, r in out["regions"].items():
        r["ratio"] = (r["mean"] / base) if (base and r["mean"] is not None and base > 0) else None
    # "after the correction": on-topic tokens that follow the first correction phrase
    first_corr = next((t for t, l in enumerate(labels) if l == "correction"), None)
    after = [t for t, l in enumerate(labels) if l == "on-topic" and first_corr is not None and t > first_corr]
    m_after = float(np.mean(a[after])) if after else None
    out["after_correction"] = {"n_tokens": len(after), "mean": m_after,
                               "ratio": (m_after / base) if (base and m_after is not None and base > 0) else None}
    return out


ON_TOPIC_BASELINE = "unsteered on-topic answers"


def region_summary(series, regions: Sequence[dict], group: LatentGroup, how: str = "sum") -> dict:
    """Region means against the group's unsteered on-topic activity, as the paper does.

    The prompt is never the baseline: a latent that fires on the system prompt would make
    every region look quiet (the first circuit read 0.4x during off-topic text that way). A
    group without a recorded on-topic mean gets no ratios, and says so.
    """
    on = (group.threshold or {}).get("on_topic_mean")
    if on and (group.threshold or {}).get("how", "sum") == how:
        return episode_summary(series, regions, baseline=ON_TOPIC_BASELINE, baseline_value=float(on))
    summ = episode_summary(series, regions, baseline="none (the group records no on-topic mean)", baseline_value=0.0)
    return summ


def region_rows(summaries: dict[str, dict]) -> list[dict]:
    """The replay's region table: one row per (group, region), ratios vs unsteered on-topic activity."""
    rows = []
    for key, s in summaries.items():
        col = f"ratio vs {s.get('baseline', ON_TOPIC_BASELINE)}"
        for lab, v in s["regions"].items():
            rows.append({"group": key, "region": lab, "tokens": v["n_tokens"], "mean": v["mean"], col: v["ratio"]})
        rows.append({"group": key, "region": "after correction (on-topic)", "tokens": s["after_correction"]["n_tokens"],
                     "mean": s["after_correction"]["mean"], col: s["after_correction"]["ratio"]})
    return rows


def verdict(summary: dict, judgement: dict | None = None) -> str:
    """One plain sentence on what the detectors did in this episode."""
    attempts = (judgement or {}).get("attempts") or []
    r = summary.get("regions", {})
    off = r.get("off-topic", {}).get("ratio")
    aft = summary.get("after_correction", {}).get("ratio")
    parts = []
    if judgement is not None:
        if len(attempts) > 1:
            sc = [round(float(a.get("score", 0))) for a in attempts]
            better = sc[-1] > sc[0]
            parts.append(f"{len(attempts)} attempts (scores {' -> '.join(map(str, sc))}): "
                         f"{'a recovery (ESR)' if better else 'a restart that did not improve the answer'}.")
        elif len(attempts) == 1:
            parts.append(f"One attempt (score {round(float(attempts[0].get('score', 0)))}): no restart.")
        else:
            parts.append("The judge found no attempt.")
    if off is not None:
        parts.append(f"Detectors during off-topic text: {off:.1f}x their mean on "
                     f"{summary.get('baseline', ON_TOPIC_BASELINE)} (paper: 4.4x).")
    if aft is not None:
        parts.append(f"After the correction: {aft:.1f}x (paper: 2.1x).")
    if off is None and aft is None:
        parts.append("No ratio (no off-topic region, or the group records no on-topic baseline).")
    return " ".join(parts)


# ----------------------------------------------------------------------------- replay (needs an engine)


def replay_episode(engine, prompt: str, response: str, circuit: LatentGroup | None,
                   backtracking: LatentGroup | None = None,
                   steering: Sequence = (), distractor: str | None = None, judgement: dict | None = None,
                   how: str = "sum", ema_alpha: float | None = 0.5) -> dict:
    """Run a transcript (prompt + response, from any model) through this model and read the groups.

    ``steering`` (add interventions) is applied during the replay forward pass when given: the
    result says which, as the paper's single example had steering on and its statistics off.
    The judge (:func:`esr_core.judge.scoring.judge_response`) locates attempts and restart phrases
    unless a ``judgement`` is passed in.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadInput("The transcript needs a prompt")
    if not isinstance(response, str) or not response.strip():
        raise BadInput("The transcript needs a response")

    tok = engine.model.tokenizer
    ids, offs, text, first = render_pair(tok, prompt, response, response_only=True)
    acts = engine.activations(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                              interventions=list(steering))
    if list(acts.token_ids) != list(ids):  # same template, same tokens: guard against template drift
        first = next((t for t, (s, e) in enumerate(acts.offsets) if s >= offs[first][0] and e > s), len(acts.token_ids))
    base = acts.text.find(response.strip()[:40]) if response.strip() else -1
    base = base if base >= 0 else (acts.offsets[first][0] if first < len(acts.offsets) else 0)
    if judgement is None:
        judgement = judge_response(prompt, response.strip(), distractor)
    # the judge's offsets are into response.strip(); shift if the template kept leading space
    regions = regions_from_judgement(judgement, acts.offsets, first, response_start_char=base)
    markers = restart_markers(judgement, acts.offsets, first, response_start_char=base)
    z = acts.z
    out = {"tokens": acts.tokens, "token_ids": acts.token_ids, "offsets": acts.offsets, "prompt_len": first,
           "regions": regions, "markers": markers, "judgement": judgement,
           "steering": [iv.to_dict() if hasattr(iv, "to_dict") else dict(iv) for iv in steering],
           "steering_on": bool(steering), "how": how, "ema_alpha": ema_alpha, "series": {}, "summary": {}}
    for key, g in (("circuit", circuit), ("backtracking", backtracking)):
        if not g or not g.members:
            continue
        s = circuit_activity(z, g, how=how, ema_alpha=ema_alpha)
        out["series"][key] = s
        out["members"] = out.get("members", {})
        out["members"][key] = member_matrix(z, g)
        out["summary"][key] = region_summary(s, regions, g, how)
    if circuit and circuit.members:
        thr = circuit.threshold_value(how)
        out["threshold"] = thr
        # the alert is about the answer: crossings on the prompt (a system prompt the group fires on) never count
        # (the smoothing restarts at the answer, so prompt activity does not carry into its first tokens)
        resp = circuit_activity(z[first:], circuit, how=how, ema_alpha=ema_alpha)
        out["crossings"] = [first + c for c in threshold_crossings(resp, thr)] if thr is not None else []
        out["verdict"] = verdict(out["summary"]["circuit"], judgement)
    out["distractor_series"] = {}
    for iv in steering:  # a steered latent is the steering SAE's: read it there, not at a readout SAE's same id
        lat = int(iv.latent if hasattr(iv, "latent") else iv["latent"])
        out["distractor_series"][lat] = acts.z_steer[:, lat].float().numpy().astype(float)
    return out


def region_rgba(label: str, alpha: float = 0.18) -> str:
    """The region's shading colour as a CSS rgba() string."""
    return palette.rgba(palette.REGIONS.get(label, "#888888"), alpha)


def replay_hooks_html(rep: dict) -> str:
    """An invisible element carrying the replay's crossings, regions and markers as data-* attributes.

    Why: a browser test (and a user's own tooling) reads what the replay found from the page
    itself, not from pixels of a chart.
    """
    def attr(v) -> str:
        return html.escape(str(v), quote=True)

    regions = ";".join(f"{r['label']}:{int(r['start'])}-{int(r['end'])}" for r in rep.get("regions", []))
    crossings = ",".join(str(int(c)) for c in rep.get("crossings", []))
    markers = ",".join(str(int(m["token"])) for m in rep.get("markers", []))
    return (f'<div class="esr-replay" style="display:none" data-prompt-len="{attr(rep.get("prompt_len", 0))}" '
            f'data-threshold="{attr(rep.get("threshold"))}" data-crossings="{attr(crossings)}" '
            f'data-regions="{attr(regions)}" data-restarts="{attr(markers)}" '
            f'data-steering="{attr("on" if rep.get("steering_on") else "off")}"></div>')
