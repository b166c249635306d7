"""Compare training settings on a validation split, never on the held-out evaluation set.

A candidate adapter (or the base model) answers the validation prompts (training prompts kept
out of its training, see ``LoraTrainConfig.validation_prompts``) steered by training-split
latents at the data's boost, and unsteered; the offline judge counts restarts and recoveries.
This is what chooses between settings (steering during training or not, mixing ratio, epochs);
the held-out prompts and latents are only ever used by the final evaluation run.
"""

from __future__ import annotations

from pathlib import Path

from esr_core.errors import BadInput
from esr_core.experiments.stats import wilson_interval as wilson
from esr_core.finetune.data import RECIPE_FILE, SPLITS_FILE, DataRecipe, encode_example, load_examples, splits
from esr_core.io import atomic_write_json, read_json
from esr_core.jobs import Progress, check_cancel, report_fraction
from esr_core.judge.scoring import judge_response, verdict
from esr_core.models.adapters import META_FILE, check_adapter, merged_dir
from esr_core.models.hooks import decoder_layers, parse_resid_hook, with_tensor
from esr_core.models.loading import resolve_model_path
from esr_core.models.registry import default_sae_spec
from esr_core.steering.engines import get_engine
from esr_core.steering.interventions import Intervention
from esr_core.steering.spec import GenerationSpec


def candidate_engine(adapter: str | Path | None, base: str):
    """An engine for base + adapter (merged into the user cache), or the base model itself."""
    if adapter is None:
        return get_engine(base)
    base_path, _ = resolve_model_path(base)
    path = merged_dir(f"candidate-{Path(adapter).name}", base_path, Path(adapter).resolve(), base)
    return get_engine(str(path), default_sae_spec(base))


def validation_items(data_dir: str | Path, prompt_ids: list[str], n: int, seed: int = 7) -> list[dict]:
    """(prompt, latent, boost in norm units, seed) per validation trial: each validation prompt
    with a training latent, round-robin; the same items for every candidate."""
    recipe = DataRecipe.from_dict(read_json(Path(data_dir) / RECIPE_FILE, "The data recipe"))
    sp = read_json(Path(data_dir) / SPLITS_FILE, "The data splits")
    prompts = {p["id"]: p["prompt"] for p in splits()["train_prompts"]}
    if set(prompt_ids) & set(sp.get("heldout_prompt_ids", [])):
        raise BadInput("A validation prompt is a held-out evaluation prompt: those are for the final evaluation only")
    unknown = [p for p in prompt_ids if p not in prompts]
    if unknown or not prompt_ids:
        raise BadInput("No validation prompts: train with --validation-prompts N to keep some out of training"
                       if not prompt_ids else f"Unknown validation prompt id(s): {', '.join(unknown[:3])}")
    lats = list(sp["train_latents"])
    return [{"prompt_id": pid, "prompt": prompts[pid], "latent": int(lats[(k * 7) % len(lats)]),
             "boost_norm": recipe.boost_norm, "seed": seed + k} for k, pid in enumerate(prompt_ids[:n])]


def validate(engine, items: list[dict], max_new_tokens: int = 128, batch_size: int = 24,
             progress: Progress | None = None, cancel=None) -> dict:
    """Steered and unsteered answers to ``items``, judged: restart and recovery rates with intervals."""
    med = float(engine.median_norm)
    rows = []
    for a in range(0, len(items), batch_size):
        check_cancel(cancel, "Validation")
        chunk = items[a : a + batch_size]
        specs = []
        for it in chunk:
            iv = Intervention(latent=it["latent"], mode="add", strength=it["boost_norm"] * med, units="raw")
            for ivs in ([iv], []):
                specs.append(GenerationSpec(prompt=it["prompt"], interventions=ivs, watch=[], top_k=0,
                                            temperature=0.6, repetition_penalty=1.1, max_new_tokens=max_new_tokens,
                                            seed=it["seed"], runs=("steered",)))
        results = engine.generate_batch(specs, cancel=cancel)
        for j, it in enumerate(chunk):
            for kind, res in (("steering", results[2 * j]), ("no_steering", results[2 * j + 1])):
                j_ = judge_response(it["prompt"], res["steered"].text)
                rows.append({"condition": kind, "prompt_id": it["prompt_id"], "latent": it["latent"],
                             "verdict": verdict(j_), "scores": [round(float(x["score"]), 1) for x in j_["attempts"]],
                             "text": res["steered"].text})
        report_fraction(progress, "validation", min(1.0, (a + len(chunk)) / len(items)),
                        f"{min(a + len(chunk), len(items))}/{len(items)} prompts")
    return {"n_items": len(items), "by_condition": {c: rates([r for r in rows if r["condition"] == c])
                                                    for c in ("steering", "no_steering")}, "rows": rows}


def rates(rows: list[dict]) -> dict:
    n = len(rows)
    multi = sum(1 for r in rows if r["verdict"] in ("multi", "esr"))
    esr = sum(1 for r in rows if r["verdict"] == "esr")
    first = [r["scores"][0] for r in rows if r["scores"]]
    lo_m, hi_m = wilson(multi, n)
    lo_e, hi_e = wilson(esr, n)
    return {"n": n, "multi_attempt_k": multi, "multi_attempt_rate": multi / n if n else None,
            "multi_attempt_ci": [lo_m, hi_m], "esr_k": esr, "esr_rate": esr / n if n else None,
            "esr_ci": [lo_e, hi_e], "first_score_mean": sum(first) / len(first) if first else None}


def validate_adapter(adapter: str | Path | None, data_dir: str | Path, base: str, n: int = 40,
                     prompt_ids: list[str] | None = None, progress: Progress | None = None, cancel=None) -> dict:
    """Validate one candidate (None = the base model) and, for an adapter, store it in its metadata."""
    if adapter is not None:
        meta = check_adapter(Path(adapter).resolve(), base)
        prompt_ids = prompt_ids or meta.get("validation_prompt_ids") or []
    items = validation_items(data_dir, list(prompt_ids or []), n)
    eng = candidate_engine(adapter, base)
    held = noticing_examples(data_dir, list(prompt_ids or []))
    tf = {"steered": noticing_logprob(eng, held, steer=True), "unsteered": noticing_logprob(eng, held, steer=False)}
    out = validate(eng, items, progress=progress, cancel=cancel)
    summary = {"n_items": out["n_items"], "by_condition": out["by_condition"], "noticing_teacher_forced": tf,
               "prompt_ids": [it["prompt_id"] for it in items]}
    if adapter is not None:
        meta["validation"] = summary
        atomic_write_json(Path(adapter) / META_FILE, meta)
    return {**summary, "rows": out["rows"]}


def noticing_logprob(engine, examples: list[dict], steer: bool = True) -> dict:
    """Teacher-forced, on self-correction examples the candidate never trained on: after the
    prompt and the drift (with the example's distractor steering on, if ``steer``), the mean
    log-probability per token of the noticing sentence and the probability of its first token.
    A sensitive measure where small-scale candidates rarely restart on their own."""
    import torch  # heavy: torch

    tok, hf = engine.model.tokenizer, engine.model.hf_model
    block = decoder_layers(hf)[parse_resid_hook(engine.sae.hook_name)[0]]
    W = engine.sae.W_dec.detach().float()
    delta = {"d": None}

    def add(_m, _i, out):
        if delta["d"] is None:
            return None
        h = out[0] if isinstance(out, tuple) else out
        return with_tensor(out, h + delta["d"].to(h.dtype).to(h.device))

    per_token, first = [], []
    hook = block.register_forward_hook(add)
    try:
        for e in examples:
            drift, noticing = e["segments"][0], e["segments"][1]
            ids, labels = encode_example(tok, {"prompt": e["prompt"], "segments": [
                drift, noticing, {"text": "", "loss": False}]}, max_len=1024)
            delta["d"] = W[int(e["latent"])] * float(e["boost"]) if steer and e.get("latent") is not None else None
            with torch.no_grad():
                logits = hf(input_ids=torch.tensor([ids], device=hf.device)).logits[0].float()
            lp = torch.log_softmax(logits[:-1], -1)
            pos = [i for i in range(1, len(ids)) if labels[i] != -100 and labels[i] != tok.eos_token_id]
            if not pos:
                continue
            vals = [float(lp[i - 1, ids[i]]) for i in pos]
            per_token.append(sum(vals) / len(vals))
            first.append(float(torch.exp(lp[pos[0] - 1, ids[pos[0]]])))
    finally:
        hook.remove()
        delta["d"] = None
    n = len(per_token)
    return {"n": n, "steer": steer, "mean_logprob_per_token": sum(per_token) / n if n else None,
            "mean_first_token_prob": sum(first) / n if n else None}


def noticing_examples(data_dir: str | Path, prompt_ids: list[str]) -> list[dict]:
    """The data's self-correction examples of the validation prompts (kept out of training)."""
    keep = set(prompt_ids)
    return [e for e in load_examples(data_dir) if e["kind"] == "self_correction" and e["prompt_id"] in keep]
