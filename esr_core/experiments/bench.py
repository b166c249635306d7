"""Throughput of the experiment path against plain ``transformers.generate``, in one run.

A fixed plan (evaluation prompts, each steered by its own latent at a fixed boost, seeded
sampling at the runner's temperature) is generated three ways at several batch sizes:
- ``ours``: the runner's path today (:func:`generate_records`: no latent readout, finished
  rows leave the batch, last-position logits only, the batched ``cdf`` sampler);
- ``before``: the path as it was before #14 (every row kept to the end, the distractor
  watched, logits for every prompt position, ``torch.multinomial`` row by row);
- ``plain``: ``generate`` on an un-instrumented copy of the weights (unsteered: the ceiling).
Ratios are taken within the run, so a busy machine moves all three together.
"""

from __future__ import annotations

import time

from esr_core.experiments.executors import generate_records
from esr_core.experiments.spec import ExperimentSpec, Trial, prompt_for, trial_interventions
from esr_core.judge.prompts import load_prompts
from esr_core.steering.batch_memory import CPU_BATCH as DEFAULT_BATCH
from esr_core.steering.spec import GenerationSpec


def bench_plan(engine, n_trials: int = 32, new_tokens: int = 96, boost_norm: float = 1.0,
               temperature: float = 0.6) -> tuple[ExperimentSpec, list[Trial], dict[str, str]]:
    """A resolved spec and its trials: prompt k steered by latent 97k+11 (a spread of latents)."""
    prompts = {p["id"]: p["prompt"] for p in load_prompts()}
    ids = sorted(prompts)[:n_trials] if n_trials <= len(prompts) else [sorted(prompts)[k % len(prompts)]
                                                                      for k in range(n_trials)]
    d_sae = engine.sae.d_sae
    latents = [(97 * k + 11) % d_sae for k in range(n_trials)]
    spec = ExperimentSpec(name="bench", model=engine.model.name, latents=sorted(set(latents)),
                          conditions=["steering"], boost_mode="fixed", boost=boost_norm, max_new_tokens=new_tokens,
                          temperature=temperature, dtype=getattr(engine.model, "dtype", "float32"))
    spec.median_norm = float(engine.median_norm)
    dec = engine.decoder_norms()
    spec.dec_norms = {str(lat): float(dec[lat]) for lat in spec.latents}
    trials = [Trial(key=f"bench|{k}", condition="steering", latent=lat, prompt_id=pid, seed=1000 + k,
                    boost=spec.boost_raw(lat, boost_norm), level=0, rep=0)
              for k, (lat, pid) in enumerate(zip(latents, ids))]
    return spec, trials, prompts


def _tokens_per_s(fn) -> float:
    t = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t)


def ours(engine, spec, trials, prompts, batch: int) -> float:
    """Tokens/s of the runner's own batch generation (what an experiment run does)."""
    def run():
        n = 0
        for a in range(0, len(trials), batch):
            recs = generate_records(spec, engine, trials[a:a + batch], prompts, a // batch)
            n += sum(r["n_tokens"] for r in recs)
        return n
    return _tokens_per_s(run)


def before(engine, spec, trials, prompts, batch: int) -> float:
    """The path before #14: rows kept in the batch to the end, the distractor watched, every
    prompt position's logits computed, one ``torch.multinomial`` per row."""
    def run():
        n = 0
        engine.last_logits_only = False  # the prompt's logits were all computed then
        for a in range(0, len(trials), batch):
            chunk = trials[a:a + batch]
            gs = [GenerationSpec(prompt=prompt_for(spec, t.condition, t.latent, prompts[t.prompt_id])[0],
                                 interventions=trial_interventions(spec, t), watch=[t.latent], top_k=0,
                                 temperature=spec.temperature, repetition_penalty=spec.repetition_penalty,
                                 max_new_tokens=spec.max_new_tokens, seed=t.seed, runs=("steered",),
                                 sampler="multinomial") for t in chunk]
            n += sum(len(r["steered"].token_ids) for r in engine.generate_batch(gs))
        return n
    keep = engine.last_logits_only
    try:
        return _tokens_per_s(run)
    finally:
        engine.last_logits_only = keep


def plain(engine, plain_model, spec, trials, prompts, batch: int) -> float:
    """``generate`` on the same prompts, left-padded, same sampling settings, no steering."""
    import torch  # heavy: torch

    tok = engine.model.tokenizer
    tok.padding_side = "left"

    def run():
        n = 0
        for a in range(0, len(trials), batch):
            texts = [engine.render_prompt(prompts[t.prompt_id]) for t in trials[a:a + batch]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(a)
            with torch.inference_mode():
                out = plain_model.generate(**enc, max_new_tokens=spec.max_new_tokens, do_sample=True,
                                           temperature=spec.temperature, repetition_penalty=spec.repetition_penalty,
                                           pad_token_id=tok.pad_token_id)
            new = out[:, enc.input_ids.shape[1]:]
            ends = tok.eos_token_id
            for row in new.tolist():  # tokens up to and including the first EOS, as ours counts them
                n += (row.index(ends) + 1) if ends in row else len(row)
        return n
    return _tokens_per_s(run)


def run_experiment_bench(engine, plain_model, batch_sizes=(8, 48, 96), n_trials: int = 96,
                         new_tokens: int = 96, log=print, repeats: int = 1) -> dict:
    """Every batch size through the three paths (best of ``repeats``, the paths interleaved so a
    busy spell slows all three); the last line is the headline ratio."""
    spec, trials, prompts = bench_plan(engine, n_trials, new_tokens)
    ours(engine, spec, trials[:2], prompts, 2)  # warm-up (first-call allocations)
    rows = {}
    for b in batch_sizes:
        r = rows[b] = {"ours": 0.0, "before": 0.0, "plain": 0.0}
        for _ in range(max(1, repeats)):
            r["ours"] = max(r["ours"], ours(engine, spec, trials, prompts, b))
            r["before"] = max(r["before"], before(engine, spec, trials, prompts, b))
            r["plain"] = max(r["plain"], plain(engine, plain_model, spec, trials, prompts, b))
        log(f"batch {b:>3}: ours {r['ours']:7.1f}  before {r['before']:7.1f}  plain generate {r['plain']:7.1f} "
            f"tokens/s  (ours/plain {r['ours'] / r['plain']:.2f}, ours/before {r['ours'] / r['before']:.2f})")
    default = DEFAULT_BATCH if DEFAULT_BATCH in rows else max(rows)
    today = rows[8]["before"] if 8 in rows else None
    out = {"dtype": spec.dtype, "n_trials": n_trials, "new_tokens": new_tokens, "rows": rows,
           "default_batch": default, "ratio": rows[default]["ours"] / rows[default]["plain"]}
    if today:
        out["vs_before_batch8"] = rows[default]["ours"] / today
        log(f"vs_before_batch8={out['vs_before_batch8']:.2f} (ours at batch {default} / the old path at batch 8)")
    log(f"ratio={out['ratio']:.3f}")
    return out
