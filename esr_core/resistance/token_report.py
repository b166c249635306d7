"""The token-level search's report: the best layer, the shipped group with its evidence, the
per-layer table and the evidence rows the Resistance page shows next to the circuit."""

from __future__ import annotations

import time
from pathlib import Path

from esr_core.errors import BadInput
from esr_core.io import atomic_write_json
from esr_core.latents.groups import GROUP_FORMAT
from esr_core.paths import portable_name
from esr_core.viz import palette


MEMBER_STATS = ("auc", "token_matched_auc", "position_matched_auc", "garbled_auc", "steering_auc", "system_ratio",
                "on_mean", "off_mean")


def best_layer(report: dict) -> dict:
    """The layer whose group separates best on held-out tokens within the crossing goal (<= 5 %)."""
    def key(layer):
        h = layer["heldout"]
        ok = (h.get("crossing_rate_unsteered") or 1.0) <= 0.05 + 1e-9
        return (ok, h.get("token_auc_off_topic") or 0.0)
    usable = [la for la in report["layers"] if la["members"]]
    if not usable:
        raise BadInput("No layer produced a group that passes the controls")
    return max(usable, key=key)


def group_dict(report: dict, layer: dict, descriptions: dict[str, str], sae_identity: dict) -> dict:
    """The shipped circuit group (LatentGroup format) with its evidence and controls."""
    cand = {c["latent"]: c for c in layer["candidates"]}
    h = layer["heldout"]
    return {
        "format": GROUP_FORMAT, "name": "resistance circuit", "kind": "off-topic detectors",
        "colour": palette.CIRCUIT, "members": layer["members"], "weights": [1.0] * len(layer["members"]),
        "description": (f"Latents active during off-topic spans of answers and quiet on on-topic answers, chosen per "
                        f"response token at {layer['hook']} on {report['n_search']} prompts and measured on "
                        f"{report['n_heldout']} held-out prompts; each passes the token-id, segment-position, "
                        f"garbling and system-prompt controls"
                        + (" and, with the drifts read live (their steering on, distractors held out with their "
                           "prompts), the steering-alone control"
                           if report.get("drifts_read", "unsteered") != "unsteered" else "") + " (see evidence)."),
        "stats": {str(j): {k: cand[j].get(k) for k in MEMBER_STATS} for j in layer["members"]},
        "descriptions": descriptions,
        "threshold": {"value": layer["threshold"], "how": "sum", "ema_alpha": report["params"]["ema_alpha"],
                      "rule": "unsteered quantile",
                      "basis": (f"{report['params']['unsteered_quantile']:.0%} quantile of the peak smoothed activity "
                                f"of on-topic answers (search split); held out it alerts on "
                                f"{h.get('crossing_rate_unsteered', 0):.0%} of unsteered answers"),
                      "on_topic_mean": h.get("on_topic_mean")},
        "evidence": {"heldout": h, "baseline": layer.get("baseline"), "rejected": layer["rejected"],
                     "n_candidates": layer["n_candidates"], "n_passing": layer["n_passing"],
                     "search_token_auc": layer["search_token_auc"]},
        "params": report["params"],
        "layers": [{k: v for k, v in r.items() if k != "members"} for r in report.get("layer_table") or []],
        "summary": {"n_prompts": report["n_prompts"], "n_heldout": report["n_heldout"],
                    "drifts_read": report.get("drifts_read", "unsteered"),
                    "inputs_sha1": report["inputs_sha1"], "n_tokens": report["n_tokens"],
                    "method": "token-level search (esr_core.resistance.token_detectors)"},
        "model": report["model"], "sae": sae_identity,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def layer_table(report: dict) -> list[dict]:
    """One row per layer: the group and its held-out numbers, and the baseline's where given."""
    rows = []
    for la in report["layers"]:
        h = la["heldout"]
        row = {"hook": la["hook"], "group": "searched", "size": len(la["members"]), "members": la["members"],
               "token_auc": h.get("token_auc_off_topic"), "token_auc_steered_drift": h.get("token_auc_steered_drift"),
               "garbled_auc": h.get("token_auc_garbled"), "unsteered_crossing": h.get("crossing_rate_unsteered"),
               "steered_drift_crossing": h.get("crossing_rate_steered_drift"),
               "garbled_crossing": max(h.get("crossing_rate_shuffled") or 0, h.get("crossing_rate_repeated") or 0),
               "steering_only_crossing": h.get("crossing_rate_steering_only"),
               "ratio_off_topic": h.get("ratio_off_topic"), "ratio_after_correction": h.get("ratio_after_correction"),
               "threshold": la["threshold"], "passing_controls": la["n_passing"]}
        rows.append(row)
        b = la.get("baseline")
        if b:
            bh = b["heldout"]
            rows.append({**{k: None for k in row}, "hook": la["hook"], "group": b["name"], "size": len(b["members"]),
                         "members": b["members"], "token_auc": bh.get("token_auc_off_topic"),
                         "token_auc_steered_drift": bh.get("token_auc_steered_drift"),
                         "garbled_auc": bh.get("token_auc_garbled"),
                         "unsteered_crossing": bh.get("crossing_rate_unsteered"),
                         "steered_drift_crossing": bh.get("crossing_rate_steered_drift"),
                         "garbled_crossing": max(bh.get("crossing_rate_shuffled") or 0,
                                                 bh.get("crossing_rate_repeated") or 0),
                         "steering_only_crossing": bh.get("crossing_rate_steering_only"),
                         "ratio_off_topic": bh.get("ratio_off_topic"),
                         "ratio_after_correction": bh.get("ratio_after_correction"), "threshold": b["threshold"]})
    return rows


def save_report(report: dict, path: str | Path) -> Path:
    """The full report (every candidate and control), written atomically."""
    atomic_write_json(Path(path), report)
    return Path(path)


EVIDENCE_ROWS = (  # (key in the held-out block, label, what a detector should show)
    ("token_auc_off_topic", "per-token AUC, off-topic vs on-topic (EMA signal)", "high"),
    ("token_auc_steered_drift", "per-token AUC, the model's own steered drift", "high"),
    ("token_auc_garbled", "per-token AUC, garbled vs clean on-topic (control)", "about 0.5"),
    ("crossing_rate_unsteered", "unsteered answers that cross the alert threshold", "<= 5 %"),
    ("crossing_rate_steered_drift", "steered drifts that cross", "high"),
    ("crossing_rate_recovery_drift", "off-topic spans of synthetic recoveries that cross", "high"),
    ("crossing_rate_shuffled", "shuffled on-topic answers that cross (control)", "low"),
    ("crossing_rate_repeated", "repetitive on-topic answers that cross (control)", "low"),
    ("crossing_rate_steering_only", "on-topic answers read with the drift's steering on that cross (control)", "low"),
    ("ratio_off_topic", "off-topic span vs unsteered on-topic activity", "paper 4.4x"),
    ("ratio_after_correction", "after the correction vs unsteered on-topic", "paper 2.1x"),
    ("ratio_garbled", "garbled vs unsteered on-topic (control)", "about 1x"),
)


def evidence_rows(group_extra: dict) -> list[dict]:
    """The held-out evidence of a token-level group next to the previous circuit's, for the app.

    Where the group also carries a live-condition check (``evidence.live``: drifts read with
    their steering on, see :func:`annotate_group`), its numbers get their own column.
    """
    ev = group_extra.get("evidence") or {}
    h = ev.get("heldout") or {}
    b = ((ev.get("baseline") or {}).get("heldout")) or {}
    bname = (ev.get("baseline") or {}).get("name", "previous circuit")
    live = (ev.get("live") or {}).get("heldout") or {}
    rows = []
    for key, label, want in EVIDENCE_ROWS:
        if key not in h and key not in live:
            continue
        row = {"measure (held-out prompts)": label, "this circuit": h.get(key)}
        if live:
            row["this circuit, drifts read live"] = live.get(key)
        if b:
            row[bname] = b.get(key)
        row["a detector should show"] = want
        rows.append(row)
    return rows


def separation_line(sep: dict) -> str:
    """The evaluation-run crossings recorded by ``detectors separation --record``, as one Markdown line."""
    st, un = sep["steered_off_topic"], sep["unsteered"]
    return (f"**Live, on the evaluation run** (`{sep['run']}`, new prompts and distractors, each answer replayed "
            f"with its own steering): crosses on **{st['crossed']} of {st['n']}** steered answers judged off-topic "
            f"and on **{un['crossed']} of {un['n']}** unsteered answers (`{sep['command']}`).")


def annotate_group(group: dict, report: dict, report_path: str = "assets/resistance/token_search.json") -> dict:
    """Add a token-level report's evidence to an existing group (the one it was compared with).

    The group's own held-out numbers become its evidence, the controlled search's group at the
    same hook the comparison column, and each member gets its control statistics; a member the
    controls reject says by what. Nothing about the group's membership or threshold changes.
    """
    hook = (group.get("sae") or {}).get("hook")
    layer = next((la for la in report["layers"] if la["hook"] == hook and la.get("baseline")), None)
    if layer is None:
        raise BadInput(f"The report has no comparison with this group at {hook}")
    if str(report.get("drifts_read", "unsteered")) != "unsteered" and (group.get("evidence") or {}).get("heldout"):
        return _annotate_live(group, report, layer, report_path)
    cand = {c["latent"]: c for c in layer["candidates"]}
    out = dict(group)
    stats = {k: dict(v) for k, v in (group.get("stats") or {}).items()}
    rejected: dict[str, int] = {}
    for j in group["members"]:
        c = cand.get(int(j))
        if c is None:
            continue
        stats.setdefault(str(j), {}).update({f"token_{k}" if k == "auc" else k: c[k] for k in (
            "auc", "token_matched_auc", "position_matched_auc", "garbled_auc", "steering_auc", "system_ratio",
            "off_rate", "on_rate") if k in c})
        stats[str(j)]["controls_failed"] = ", ".join(c["rejected_by"]) or "none"
        for w in c["rejected_by"]:
            rejected[w] = rejected.get(w, 0) + 1
    out["stats"] = stats
    out["evidence"] = {
        "heldout": layer["baseline"]["heldout"],
        "baseline": {"name": f"controlled search at {hook} ({len(layer['members'])} latents)",
                     "members": layer["members"], "heldout": layer["heldout"]},
        "rejected": rejected, "n_candidates": len(group["members"]),
        "n_passing": sum(1 for j in group["members"] if cand.get(int(j)) and not cand[int(j)]["rejected_by"]),
        "report": str(report_path), "command": report.get("command"),
        "drifts_read": report.get("drifts_read", "unsteered"),
    }
    out["layers"] = [{k: v for k, v in r.items() if k != "members"} for r in report.get("layer_table") or []]
    h = layer["baseline"]["heldout"]
    fails = ", ".join(sorted(rejected)) or "none"
    out["description"] = (str(group.get("description", "")).split(" Token-level check")[0]
                          + f" Token-level check at {hook} on held-out prompts: {out['evidence']['n_passing']} of "
                            f"{len(group['members'])} members pass the controls (failed: {fails}); it crosses its "
                            f"threshold on {h.get('crossing_rate_unsteered', 0):.0%} of unsteered answers and on "
                            f"{max(h.get('crossing_rate_shuffled') or 0, h.get('crossing_rate_repeated') or 0):.0%} of "
                            f"garbled on-topic answers: it marks odd text, off-topic or not.")
    return out


def _annotate_live(group: dict, report: dict, layer: dict, report_path: str) -> dict:
    """A live-condition report (drifts read with their steering on) added beside the existing evidence.

    The group keeps its evidence; ``evidence.live`` gets the group's held-out numbers in the live
    condition (with the steering-alone control), and each member its steering AUC.
    """
    out = dict(group)
    ev = dict(out.get("evidence") or {})
    ev["live"] = {"heldout": layer["baseline"]["heldout"], "report": str(report_path), "command": report.get("command"),
                  "drifts_read": report.get("drifts_read"), "distractors_held_out": report.get("distractors_held_out"),
                  "controlled": {"members": layer["members"], "heldout": layer["heldout"]},
                  "layers": [{k: v for k, v in r.items() if k != "members"} for r in report.get("layer_table") or []]}
    out["evidence"] = ev
    cand = {c["latent"]: c for c in layer["candidates"]}
    stats = {k: dict(v) for k, v in (out.get("stats") or {}).items()}
    for j in out["members"]:
        c = cand.get(int(j))
        if c is not None and c.get("steering_auc") is not None:
            stats.setdefault(str(j), {})["steering_auc"] = c["steering_auc"]
    out["stats"] = stats
    h = layer["baseline"]["heldout"]
    out["description"] = (str(out.get("description", "")).split(" Read live")[0]
                          + f" Read live (drifts with their steering on): it crosses on "
                            f"{h.get('crossing_rate_steered_drift') or 0:.0%} of held-out steered drifts and on "
                            f"{h.get('crossing_rate_steering_only') or 0:.0%} of on-topic answers read with the same "
                            f"steering, against {h.get('crossing_rate_unsteered') or 0:.0%} unsteered.")
    return out


def add_layer_rows(group: dict, report: dict, report_path: str, base: dict | None = None) -> dict:
    """Another layer, searched later on the same inputs, added to a group's per-layer table.

    The table a group shows (its live evidence's, else its own) came from one report, ``base``
    (read from the path the group records; a group made by the search records its inputs' hash
    itself). A report over other inputs, another held-out split or the other reading condition
    would not be comparable, so it is refused; rows of the same hook and group are replaced, so
    adding a report twice changes nothing. Each added row names its report and SAE.
    """
    live = (group.get("evidence") or {}).get("live")
    ref = base or {}
    sha = ref.get("inputs_sha1") if live else (group.get("summary") or {}).get("inputs_sha1")
    read = ref.get("drifts_read") if live else (group.get("summary") or {}).get("drifts_read")
    n_held = ref.get("n_heldout") if live else (group.get("summary") or {}).get("n_heldout")
    if live and not base:
        raise BadInput(f"The report behind this group's live table ({live.get('report')}) is needed to compare inputs")
    if not sha or sha != report.get("inputs_sha1"):
        raise BadInput(f"{report_path} was searched on other inputs ({report.get('inputs_sha1')}) than this group's "
                       f"table ({sha}): its rows would not be comparable")
    if read != report.get("drifts_read", "unsteered") or n_held != report.get("n_heldout") or (
            base and base.get("heldout_ids") != report.get("heldout_ids")):
        raise BadInput(f"{report_path} reads the drifts another way or holds out other prompts than this group's table")
    sae = {la["hook"]: (la.get("sae") or {}) for la in report["layers"]}
    new = [{**{k: v for k, v in r.items() if k != "members"}, "report": str(report_path),
            "sae": portable_name(sae.get(r["hook"], {}).get("source", "")),
            "d_sae": sae.get(r["hook"], {}).get("d_sae")} for r in report.get("layer_table") or []]
    out = dict(group)
    old = (live or {}).get("layers") if live else group.get("layers")
    keys = {(r["hook"], r["group"]) for r in new}
    rows = [r for r in old or [] if (r.get("hook"), r.get("group")) not in keys] + new
    if live:
        out["evidence"] = {**out["evidence"], "live": {**live, "layers": rows}}
    else:
        out["layers"] = rows
    return out
