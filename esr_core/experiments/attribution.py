"""Which latents drive a restart: gradient x activation attribution, confirmed by ablation.

Why: the contrastive detectors are chosen because they *correlate* with off-topic text; a
restart is caused by something. For every restart of a run (a trial whose answer contains a
restart phrase), the answer is replayed with the trial's own steering; at the readout hook the
residual is replaced by the SAE's reconstruction plus the (frozen) reconstruction error, so the
logit of the restart phrase's first token at the position before it can be differentiated with
respect to every latent of every earlier response token. ``z * dlogit/dz`` summed over those
tokens is each latent's attribution; it is averaged over restarts. Confirmation: ablating the
top-k attributed latents (on the tokens before the restart) must lower the restart token's
log-probability, and ablating k random latents that were active there must not (several draws).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from esr_core.errors import BadInput
from esr_core.experiments.cases import trial_of
from esr_core.experiments.spec import trial_interventions
from esr_core.experiments.store import load_spec, load_trials
from esr_core.io import read_json
from esr_core.jobs import Progress, check_cancel, report_fraction
from esr_core.judge.scoring import judge_response
from esr_core.latents.groups import GROUP_FORMAT, LatentGroup, member_descriptions, sae_identity
from esr_core.models.hooks import on_output
from esr_core.resistance.episodes import render_pair
from esr_core.resistance.signals import ema
from esr_core.steering.interventions import add_direction, position_mask
from esr_core.viz import palette


@dataclass
class AttributionParams:
    conditions: tuple[str, ...] = ("steering", "meta_prompt")
    limit: int | None = None  # restarts to use at most (None: all)
    top_k: int = 10
    random_draws: int = 5
    seed: int = 0


def restart_cases(run_dir: str | Path, conditions, limit: int | None = None) -> list[dict]:
    """Trials with a restart phrase: prompt (as sent), response, interventions and the restart char."""
    spec = load_spec(run_dir)
    t = load_trials(run_dir)
    t = t[t["condition"].isin(list(conditions)) & (t["restart_phrases"] > 0)]
    out = []
    for _, r in t.iterrows():
        prompt = str(r.get("prompt_sent") or r["prompt"])
        resp = str(r["response"]).strip()
        j = judge_response(prompt, resp)
        starts = sorted(int(p["start_char"]) for p in j.get("restart_phrases") or [] if p.get("start_char") is not None)
        if not starts or starts[0] < 8:
            continue  # a restart with nothing before it has nothing to attribute to
        ivs = [iv for iv in trial_interventions(spec, trial_of(r.to_dict())) if iv.mode == "add"]
        out.append({"key": r.get("key"), "condition": r["condition"], "prompt": prompt, "response": resp,
                    "restart_char": starts[0], "interventions": ivs})
        if limit is not None and len(out) >= limit:
            break
    return out


def _forward_with(engine, read_sae, ids: list[int], prompt_len: int, ivs, edit):
    """One differentiable forward: steering at the engine's hook, ``edit(h)`` at the readout hook."""
    import torch  # heavy: torch

    model = engine.model
    dev = engine.device
    pos = torch.arange(len(ids), device=dev)
    compiled = engine.compile_interventions(list(ivs))

    def steer(h):
        h = h.clone()
        for iv, coef in compiled:
            add_direction(h[0], position_mask(pos, prompt_len, iv.positions), coef, engine.W_dec[iv.latent])
        return h

    handles = [on_output(model, engine.hook_name, steer)] if compiled else []
    handles.append(on_output(model, read_sae.hook_name, edit))
    try:
        with torch.enable_grad():
            return model.hf_model(input_ids=torch.tensor([ids], device=dev)).logits[0]
    finally:
        for hd in handles:
            hd.remove()


def attribute_case(engine, read_sae, case: dict, watch=()) -> dict:
    """Attribution of one restart: per latent, summed over the response tokens before it
    (with the ``watch`` latents' activations on those tokens, for the detectors' alert)."""
    import torch  # heavy: torch

    tok = engine.model.tokenizer
    ids, offs, text, first = render_pair(tok, case["prompt"], case["response"], True)
    base = text.find(case["response"])
    r = next((t for t, (s, e) in enumerate(offs) if s >= base + case["restart_char"] and e > s), None)
    if r is None or r <= first:
        raise BadInput("The restart phrase is not inside the response")
    ids = ids[: r + 1]
    target = int(ids[r])
    got: dict = {}

    def edit(h):
        with torch.no_grad():
            z0 = read_sae.encode(h).float()
        z = z0.clone().requires_grad_(True)
        recon = read_sae.decode(z).to(h.dtype)
        got["z"] = z
        return recon + (h - recon).detach()

    for p in engine.model.hf_model.parameters():
        p.requires_grad_(False)
    logits = _forward_with(engine, read_sae, ids, first, case["interventions"], edit)
    logp = torch.log_softmax(logits[r - 1].float(), dim=-1)[target]
    (grad,) = torch.autograd.grad(logp, got["z"])
    z = got["z"].detach()[0]
    contrib = (z * grad[0])[first:r].sum(dim=0)  # the response tokens before the restart
    active = (z[first:r] > 0).any(dim=0)
    return {"ids": ids, "first": first, "restart": r, "target": target, "logp": float(logp.detach()),
            "watch_acts": z[first:r][:, list(watch)].cpu().numpy() if len(watch) else None,
            "attribution": contrib.cpu().numpy(), "active": active.cpu().numpy(),
            "peak_token": {int(j): int(first + torch.argmax((z * grad[0])[first:r, j]).item())
                           for j in torch.topk(contrib, 20).indices.tolist()}}


def ablated_logp(engine, read_sae, case: dict, res: dict, latents) -> float:
    """The restart token's log-probability with ``latents`` zeroed on the tokens before it."""
    import torch  # heavy: torch

    lat = torch.tensor(list(latents), dtype=torch.long)
    first, r = res["first"], res["restart"]

    def edit(h):
        z = read_sae.encode(h).float()
        W = read_sae.W_dec.float()
        delta = torch.zeros_like(h, dtype=torch.float32)
        delta[0, first:r] = z[0, first:r][:, lat] @ W[lat]
        return h - delta.to(h.dtype)

    with torch.no_grad():
        logits = _forward_with(engine, read_sae, res["ids"], first, case["interventions"], edit)
        return float(torch.log_softmax(logits[r - 1].float(), dim=-1)[res["target"]])


def run_attribution(engine, run_dir: str | Path, read_sae=None, params: AttributionParams | None = None,
                    detectors=None, progress: Progress | None = None, cancel=None,
                    detector_threshold: float | None = None) -> dict:
    """Attribution over a run's restarts, the top-k ablation against random ablations, overlap with
    ``detectors``; with ``detector_threshold`` also when the detectors' smoothed sum first crosses
    it before each restart (their lead time, beside the attributed latents')."""
    params = params or AttributionParams()
    read_sae = read_sae or getattr(engine, "read_sae", None) or engine.sae
    cases = restart_cases(run_dir, params.conditions, params.limit)
    if not cases:
        raise BadInput(f"{run_dir} has no trial with a restart phrase in {', '.join(params.conditions)}")
    results = []
    for k, c in enumerate(cases):
        check_cancel(cancel, "Attribution")
        try:
            results.append((c, attribute_case(engine, read_sae, c, sorted(set(detectors or [])))))
        except BadInput:
            continue
        report_fraction(progress, "attribution", (k + 1) / (2 * len(cases)), f"gradients {k + 1}/{len(cases)}")
    if not results:
        raise BadInput("No restart could be located in its response")
    A = np.mean([r["attribution"] for _, r in results], axis=0)
    top = [int(j) for j in np.argsort(-A)[: params.top_k]]
    rng = np.random.default_rng(params.seed)
    rows = []
    for k, (c, r) in enumerate(results):
        check_cancel(cancel, "Attribution")
        ab = ablated_logp(engine, read_sae, c, r, top)
        pool = np.setdiff1d(np.flatnonzero(r["active"]), top)
        rand = [ablated_logp(engine, read_sae, c, r, rng.choice(pool, size=min(len(top), len(pool)), replace=False))
                for _ in range(params.random_draws)] if len(pool) else []
        rows.append({"key": c["key"], "condition": c["condition"], "restart_token": r["restart"] - r["first"],
                     "logp": round(r["logp"], 4), "logp_top_ablated": round(ab, 4),
                     "logp_random_ablated": [round(x, 4) for x in rand],
                     "top_peak_lead": [r["restart"] - r["peak_token"][j] for j in top if j in r["peak_token"]],
                     "detector_alert_lead": _alert_lead(r["watch_acts"], detector_threshold)})
        report_fraction(progress, "attribution", 0.5 + (k + 1) / (2 * len(results)), f"ablations {k + 1}/{len(results)}")
    d_top = [x["logp_top_ablated"] - x["logp"] for x in rows]
    d_rand = [np.mean(x["logp_random_ablated"]) - x["logp"] for x in rows if x["logp_random_ablated"]]
    det = sorted(set(detectors or []))
    leads = [v for x in rows for v in x["top_peak_lead"]]
    return {
        "format": "esr-attribution-v1", "run": str(run_dir), "model": engine.model.name,
        "read_hook": read_sae.hook_name, "steer_hook": engine.hook_name, "params": asdict(params),
        "n_restarts": len(rows), "top": [{"latent": j, "attribution": round(float(A[j]), 5)} for j in top],
        "mean_delta_logp_top": round(float(np.mean(d_top)), 4),
        "mean_delta_logp_random": round(float(np.mean(d_rand)), 4) if d_rand else None,
        "share_top_lowers_more": round(float(np.mean([a < b for a, b in zip(d_top, d_rand)])), 3) if d_rand else None,
        "restart_prob_top_ablated_ratio": round(float(np.exp(np.mean(d_top))), 4),
        "detectors": det, "overlap_with_detectors": sorted(set(top) & set(det)),
        "detector_attribution_rank": {str(j): int(np.sum(A > A[j])) + 1 for j in det if j < len(A)},
        "median_peak_lead_tokens": float(np.median(leads)) if leads else None,
        **_alert_summary(rows, detector_threshold),
        "rows": rows,
    }


def _alert_lead(acts, threshold: float | None) -> int | None:
    """Tokens from the detectors' first alert (EMA 0.5 of their summed activity above
    ``threshold``) to the restart; None when they do not alert before it."""
    if acts is None or threshold is None or not len(acts):
        return None
    lane = ema(np.asarray(acts, dtype=np.float64).sum(axis=1), 0.5)
    hit = np.flatnonzero(lane > threshold)
    return int(len(lane) - hit[0]) if len(hit) else None


def _alert_summary(rows: list[dict], threshold: float | None) -> dict:
    if threshold is None:
        return {}
    leads = [x["detector_alert_lead"] for x in rows if x["detector_alert_lead"] is not None]
    return {"detector_threshold": round(float(threshold), 5),
            "detector_alert_share": round(len(leads) / max(1, len(rows)), 3),
            "detector_median_alert_lead": float(np.median(leads)) if leads else None}


def attribution_group(report: dict, engine, read_sae=None):
    """The attributed restart drivers as a group (with the ablation evidence) for the app."""
    sae = read_sae or engine.sae  # the group belongs to the SAE it was attributed to
    members = [t["latent"] for t in report["top"]]
    return LatentGroup.from_dict({
        "format": GROUP_FORMAT, "name": "restart drivers", "kind": "attributed (gradient x activation)",
        "colour": palette.RESTART, "members": members, "weights": [1.0] * len(members),
        "description": (f"The {len(members)} latents at {report['read_hook']} whose gradient x activation on the tokens "
                        f"before a restart most raises the restart token's logit, averaged over {report['n_restarts']} "
                        f"restarts of {Path(report['run']).name}. Ablating them changes its log-probability by "
                        f"{report['mean_delta_logp_top']:+.2f} (random active latents: "
                        f"{report['mean_delta_logp_random']:+.2f})."),
        "stats": {str(t["latent"]): {"attribution": t["attribution"]} for t in report["top"]},
        "descriptions": member_descriptions(engine, members, sae),
        "evidence": {k: report[k] for k in ("n_restarts", "mean_delta_logp_top", "mean_delta_logp_random",
                                            "share_top_lowers_more", "overlap_with_detectors",
                                            "detector_attribution_rank", "median_peak_lead_tokens")},
        "model": engine.model.name, "sae": sae_identity(engine, sae),
    })


ATTRIBUTION_FILE = "attribution.json"  # the steering layer's; ``attribution.<layer>.json`` for readout SAEs


def attribution_reports(run_dir: str | Path) -> list[dict]:
    """Every attribution report of a run (the steering SAE's first, then each readout SAE's);
    an unreadable file is skipped with its error as a report of its own."""
    d = Path(run_dir)
    out = []
    for p in sorted(d.glob("attribution*.json"), key=lambda p: (p.name != ATTRIBUTION_FILE, p.name)):
        try:
            out.append(read_json(p, f"Attribution report {p.name}"))
        except BadInput as exc:
            out.append({"error": str(exc), "file": p.name})
    return out


def attribution_caption(report: dict) -> str:
    """One paragraph saying what the attribution shows, whatever it shows."""
    top = [t["latent"] for t in report.get("top", [])]
    d_top, d_rand = report.get("mean_delta_logp_top"), report.get("mean_delta_logp_random")
    share = report.get("share_top_lowers_more")
    ranks = report.get("detector_attribution_rank") or {}
    parts = [f"Over {report.get('n_restarts')} restarts the top {len(top)} latents at {report.get('read_hook')} "
             f"are {', '.join(f'#{j}' for j in top)}."]
    if d_top is not None and d_rand is not None:
        parts.append(f"Ablating them on the tokens before the restart changes the restart token's log-probability by "
                     f"{d_top:+.2f} on average (probability x{math.exp(d_top):.2f}); ablating as many random active "
                     f"latents changes it by {d_rand:+.2f}; the top set lowers it more on {share:.0%} of restarts.")
    if ranks:
        parts.append("The off-topic circuit's members rank " + ", ".join(f"#{j}: {r}" for j, r in ranks.items())
                     + f" by attribution; overlap with the top {len(top)}: "
                     + (", ".join(f"#{j}" for j in report.get("overlap_with_detectors") or []) or "none") + ".")
    for name, common in (report.get("overlap_with_groups") or {}).items():
        parts.append(f"Overlap with {Path(name).stem}: " + (", ".join(f"#{j}" for j in common) or "none") + ".")
    if report.get("detector_alert_share") is not None:
        lead = report.get("detector_median_alert_lead")
        parts.append(f"The circuit alerts before {report['detector_alert_share']:.0%} of the restarts"
                     + (f", a median {lead:g} token(s) ahead." if lead is not None else "."))
    if report.get("median_peak_lead_tokens") is not None:
        parts.append(f"Each top latent's largest contribution sits a median {report['median_peak_lead_tokens']:g} "
                     f"token(s) before the restart.")
    parts.append(f"Command: {report.get('command', 'esr-lab detectors attribute')}.")
    return " ".join(parts)
