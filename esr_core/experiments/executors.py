"""Where an experiment's batches run: in this process (the default) or on Ray actors.

The driver (:func:`esr_core.experiments.runner.run_experiment`) owns the run folder: it decides
which batches of the fixed partition are pending, writes every record to the append-only logs
(a key is logged once, whoever sent it) and finalises. An executor only turns a
:class:`BatchJob` into a :class:`BatchResult`: it generates the batch (always with the same
companions, so numerics match a resumed or in-process run) and judges it.

This module has the job types and the in-process executor; the Ray one lives in
:mod:`esr_core.experiments.ray_executor` and is imported only when asked for.
"""

from __future__ import annotations

import math
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from esr_core.errors import EsrError
from esr_core.experiments.calibrate import calibrate_latents
from esr_core.experiments.metrics import degraded_output, trial_flags
from esr_core.experiments.spec import ExperimentSpec, Trial, prompt_for, trial_interventions
from esr_core.jobs import CancelLike
from esr_core.judge.scoring import get_judge
from esr_core.steering.spec import GenerationSpec

EXECUTORS = ("in-process", "ray")


@dataclass
class BatchJob:
    """One batch of the plan's fixed partition and what is left to do for it."""

    batch_id: int
    trials: list[Trial]
    generated: list[dict] | None = None  # its generation records when only judging is left
    judge: bool = True


@dataclass
class BatchResult:
    batch_id: int
    generated: list[dict] = field(default_factory=list)  # one record per trial, in batch order
    judged: list[dict] = field(default_factory=list)  # empty when judging was not asked for
    cancelled: bool = False
    environment: dict | None = None  # where it ran (device, dtype, versions), for the spec
    worker: str = "in-process"


def environment_of(eng) -> dict:
    """Where a batch ran: device, library versions, CPUs (recorded in the run's spec)."""
    import torch  # heavy: torch

    dev = str(getattr(eng, "device", "cpu"))
    env = {"device": dev, "torch": torch.__version__, "python": platform.python_version(),
           "host_cpus": os.cpu_count(), "dtype": getattr(eng.model, "dtype", "float32")}
    if dev.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers  # heavy: transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def make_judge(spec: ExperimentSpec):
    return get_judge(spec.judge)


def generate_records(spec: ExperimentSpec, eng, batch: list[Trial], prompts: dict[str, str], batch_id: int,
                     cancel: CancelLike = None) -> list[dict] | None:
    """Generate one whole batch (always the same companions); None when cancelled mid-batch.

    The experiment reads nothing per token (no watched latent, no top-k): only the text and
    the token count are logged, so the engine skips its SAE readout entirely.
    """
    gspecs, metas = [], []
    for t in batch:
        base = prompts[t.prompt_id]
        sent, variant = prompt_for(spec, t.condition, t.latent, base)
        gspecs.append(GenerationSpec(prompt=sent, interventions=trial_interventions(spec, t), watch=[], top_k=0,
                                     temperature=spec.temperature, repetition_penalty=spec.repetition_penalty,
                                     max_new_tokens=spec.max_new_tokens, seed=t.seed, runs=("steered",),
                                     sampler=spec.sampler))
        metas.append((base, sent, variant))
    t0 = time.time()
    res = eng.generate_batch(gspecs, cancel=cancel, compact=True)  # finished rows leave the batch
    dt = time.time() - t0
    if any(r["steered"].stop_reason == "cancelled" for r in res):
        return None
    out = []
    n_tok = sum(len(r["steered"].token_ids) for r in res)
    for t, (base, sent, variant), r in zip(batch, metas, res):
        rr = r["steered"]
        out.append({"key": t.key, "condition": t.condition, "latent": t.latent, "prompt_id": t.prompt_id,
                    "seed": t.seed, "boost": t.boost, "level": t.level, "rep": t.rep,
                    "ablation_seed": t.ablation_seed, "meta_variant": variant, "prompt": base, "prompt_sent": sent,
                    "response": rr.text, "n_tokens": len(rr.token_ids), "stop_reason": rr.stop_reason,
                    "batch_id": batch_id, "batch_size": len(batch), "batch_tokens": n_tok,
                    "batch_s": round(dt, 3)})
    return out


def _strip_judgement(j: dict) -> list[dict]:
    return [{k: a.get(k) for k in ("text", "score", "start", "end") if k in a} for a in j.get("attempts", [])]


def judge_record(spec: ExperimentSpec, g: dict, judge_fn) -> dict:
    """A generation record plus its judgement (errors are recorded, never raised)."""
    rec = dict(g)
    label = spec.latent_labels.get(str(g["latent"]), "")
    rec["latent_label"] = label
    rec["boost_norm"] = spec.boost_norm(g["latent"], g["boost"])
    rec["degraded"] = degraded_output(g.get("response") or "")
    try:
        j = judge_fn(g["prompt"], g.get("response") or "", label)
        atts = _strip_judgement(j)
        flags = trial_flags({"attempts": atts})
        rec.update(attempts=atts, n_attempts=flags["n_attempts"], first_score=flags["first_score"],
                   last_score=flags["last_score"], restart_phrases=len(j.get("restart_phrases") or []),
                   error=None, judge_id=str(getattr(judge_fn, "judge_id", spec.judge_id)))
    except EsrError as exc:
        rec.update(attempts=None, n_attempts=None, first_score=None, last_score=None, error=str(exc)[:300],
                   judge_id=spec.judge_id)
    for k in ("first_score", "last_score"):
        if isinstance(rec.get(k), float) and math.isnan(rec[k]):
            rec[k] = None
    return rec


def judge_records(spec: ExperimentSpec, gens: list[dict], judge_fn) -> list[dict]:
    """Judge a batch's records, in order; a judge with ``concurrency`` > 1 (the HTTP judge, whose
    own throttle bounds the requests in flight) judges them from that many threads."""
    n = min(len(gens), int(getattr(judge_fn, "concurrency", 1) or 1))
    if n <= 1:
        return [judge_record(spec, g, judge_fn) for g in gens]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="esr-judge") as pool:
        return list(pool.map(lambda g: judge_record(spec, g, judge_fn), gens))


def do_job(spec: ExperimentSpec, eng_fn: Callable[[], object], judge_fn, job: BatchJob, prompts: dict[str, str],
           cancel: CancelLike = None) -> BatchResult:
    """Generate (unless already generated) and judge one batch: the work every executor does."""
    gens = job.generated
    if gens is None:
        gens = generate_records(spec, eng_fn(), job.trials, prompts, job.batch_id, cancel)
        if gens is None:
            return BatchResult(job.batch_id, cancelled=True)
    judged = judge_records(spec, gens, judge_fn) if job.judge else []
    return BatchResult(job.batch_id, generated=gens if job.generated is None else [], judged=judged)


class InProcessExecutor:
    """Batches one after another in this process, with the shared engine (the default; no Ray)."""

    name = "in-process"

    def __init__(self, engine_fn: Callable[[], object]):
        self._engine_fn = engine_fn

    def run(self, spec: ExperimentSpec, jobs: Iterable[BatchJob], prompts: dict[str, str], judge_fn,
            cancel: CancelLike = None) -> Iterator[BatchResult]:
        """Lazily: the next batch starts only when the driver has logged the previous one."""
        for job in jobs:
            yield do_job(spec, self._engine_fn, judge_fn, job, prompts, cancel)

    def calibrate(self, spec: ExperimentSpec, eng, judge_fn, prompts, progress=None, cancel: CancelLike = None):
        return calibrate_latents(spec, eng, judge_fn, prompts, progress=progress, cancel=cancel)

    def close(self) -> None:
        pass
