"""Run an ESR experiment: resolve the spec, calibrate boosts, generate, judge, summarise.

Why it is built this way (arXiv 2602.06941; ESR_METHOD.md sec. 1-7):
- Everything a trial needs is decided up front and saved in ``spec.json`` (latents, each
  latent's prompts, boosts, ablation sets), so every condition replays the same (prompt,
  seed, boost) triples and ``resume`` recomputes the same trial keys.
- Two append-only logs, fsynced per record: ``generations.jsonl`` (the model's output) and
  ``trials.jsonl`` (output + judgement). A crash, a cancel or a page rerun loses at most the
  batch in flight; a torn last line is ignored. Generation and judging are separate stages
  so one can run where the model is fast and the other where the judge is (``judge=False``
  then a later resume judges what is pending).
- Batches are a fixed partition of the plan: a resumed batch is regenerated with the same
  companions, so its numerics (and sampled tokens) match an uninterrupted run exactly.
- ``trials.parquet`` (one row per trial) and ``summary.json`` are rewritten atomically at the
  end and on demand (:func:`finalize`).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np

from esr_core.errors import BadInput, Cancelled, EsrError
from esr_core.experiments.boost import boost_sweep_levels
from esr_core.experiments.calibrate import calibrate_latents
from esr_core.experiments.conditions import GROUP_PREFIX
from esr_core.experiments.distractors import clean_label, select_distractors
from esr_core.experiments.executors import EXECUTORS, BatchJob, InProcessExecutor, environment_of, make_judge
from esr_core.experiments.report import finalize
from esr_core.experiments.spec import ExperimentSpec, batches, plan_trials
from esr_core.experiments.store import (
    GEN_FILE,
    PROGRESS_FILE,
    REFERENCE_DIR,
    SPEC_FILE,
    TRIALS_FILE,
    RunProgress,
    default_run_dir,
    load_spec,
    load_trials,
    run_lock,
)
from esr_core.io import append_jsonl, atomic_write_json, read_jsonl, seal_log
from esr_core.jobs import BackgroundJob, CancelLike, Progress, is_cancelled
from esr_core.judge.prompts import load_prompts
from esr_core.latents.catalog.build import catalog_for
from esr_core.latents.catalog.store import load_catalog_for_names, sae_weights_hash
from esr_core.latents.groups import find_group
from esr_core.steering.batch_memory import auto_batch_size

log = logging.getLogger(__name__)


def engine_for(spec: ExperimentSpec | None, engine=None):
    """``engine`` if given, else the shared engine for the spec's model and SAE (the default without a spec)."""
    if engine is not None:
        if spec is not None and getattr(engine.model, "dtype", "float32") != spec.dtype:
            raise BadInput(f"This run's model weights are {spec.dtype}; the engine given is "
                           f"{getattr(engine.model, 'dtype', 'float32')}")
        return engine
    from esr_core.steering.engines import get_engine  # heavy: pulls torch

    return get_engine(spec.model, spec.sae, dtype=spec.dtype) if spec is not None else get_engine()


def _catalog(engine, build: bool):
    try:
        cat = load_catalog_for_names(engine.model.name, engine.sae)
    except EsrError:
        cat = None
    if cat is None and build:
        cat = catalog_for(engine.model, engine.sae)
    return cat


def resolve_spec(spec: ExperimentSpec, engine=None, judge_fn=None, progress: RunProgress | None = None,
                 cancel: CancelLike = None, catalog=None, calibrate=None) -> ExperimentSpec:
    """Fill in everything a trial needs (idempotent: a resolved spec is returned as is).

    ``calibrate`` (an executor's, same signature as :func:`calibrate_latents`) spreads the boost
    calibration; by default it runs here."""
    if spec.resolved:
        return spec

    spec.validate()
    eng = engine_for(spec, engine)
    if not spec.batch_size:
        spec.batch_size = auto_batch_size(eng, max(spec.max_new_tokens, spec.calib_tokens()))
    spec.hook = eng.hook_name
    spec.sae_key = eng.sae.key
    spec.sae_weights_hash = sae_weights_hash(eng.sae)
    spec.median_norm = float(eng.median_norm)
    judge_fn = judge_fn or make_judge(spec)
    spec.judge_id = str(getattr(judge_fn, "judge_id", spec.judge))
    prompts = {p["id"]: p["prompt"] for p in load_prompts()}
    if not spec.prompt_ids:
        spec.prompt_ids = list(prompts)
    missing = [p for p in spec.prompt_ids if p not in prompts]
    if missing:
        raise BadInput(f"Unknown prompt id(s): {', '.join(missing[:5])}")
    need_catalog = not spec.latents or "random_ablation" in spec.conditions
    cat = catalog if catalog is not None else _catalog(eng, build=not spec.latents)
    if not spec.latents:
        if progress:
            progress("select", 0, 1, "choosing distractor latents", force=True)
        sel = select_distractors(cat, eng, [prompts[i] for i in spec.prompt_ids], spec.n_latents,
                                 rule=spec.relevance_rule, min_concreteness=spec.min_concreteness,
                                 seed=spec.selection_seed, cancel=cancel)
        spec.latents = [int(x) for x in sel["latents"]]
        spec.latent_labels = {str(k): v for k, v in sel["labels"].items()}
        spec.selection = dict(sel["report"], concreteness={str(k): v for k, v in sel["scores"].items()})
    else:
        spec.latents = [eng.sae.check_latent(int(x)) for x in spec.latents]
        spec.selection = {"rule": "given", "note": "latents given explicitly"}
    for lat in spec.latents:
        if str(lat) not in spec.latent_labels:
            label = ""
            if cat is not None:
                label = clean_label(cat.description(lat))
            spec.latent_labels[str(lat)] = label or f"latent #{lat}"
    # each latent's prompts: a seeded sample of the pool
    for lat in spec.latents:
        rng = np.random.default_rng([spec.base_seed, lat])
        k = min(spec.prompts_per_latent, len(spec.prompt_ids))
        idx = sorted(rng.choice(len(spec.prompt_ids), size=k, replace=False).tolist())
        spec.latent_prompts[str(lat)] = [spec.prompt_ids[i] for i in idx]
    dec = eng.decoder_norms()
    spec.dec_norms = {str(lat): float(dec[lat]) for lat in spec.latents}
    # ablation sets
    conds = list(spec.conditions)
    det_members: list[int] = []
    if "detector_ablation" in conds or "random_ablation" in conds:
        g = find_group(spec.detector_group)
        if g is None:
            if "detector_ablation" in conds:
                spec.skipped_conditions["detector_ablation"] = f"detector group '{spec.detector_group}' not found"
        else:
            g.check(eng.sae.d_sae)
            det_members = [int(m) for m in g.members]
            spec.groups["detector_ablation"] = det_members
    for c in conds:
        if c.startswith(GROUP_PREFIX):
            name = c[len(GROUP_PREFIX):]
            g = find_group(name)
            if g is None:
                spec.skipped_conditions[c] = f"latent group '{name}' not found"
            else:
                g.check(eng.sae.d_sae)
                spec.groups[c] = [int(m) for m in g.members]
    if "random_ablation" in conds:
        if cat is None and need_catalog:
            log.info("no catalog: random ablation sets are drawn from all latents")
        draw_random_sets(spec, det_members, eng.sae.d_sae, cat.dead if cat is not None else None)
    # boosts
    if spec.boost_mode == "fixed":
        for lat in spec.latents:
            raw = float(spec.boost) if spec.boost_units == "raw" else spec.boost_raw(lat, float(spec.boost))
            spec.boosts[str(lat)] = [raw]
    else:
        cal = (calibrate or calibrate_latents)(spec, eng, judge_fn, prompts, progress=progress, cancel=cancel)
        if is_cancelled(cancel):
            raise Cancelled("Experiment cancelled during boost calibration")
        spec.calibration = {str(k): v for k, v in cal.items()}
        spec.thresholds = {str(k): float(v["boost_raw"]) for k, v in cal.items()}
        if spec.boost_mode == "calibrate":
            spec.boosts = {str(k): [spec.thresholds[str(k)]] for k in spec.latents}
        else:
            levels = boost_sweep_levels(list(spec.thresholds.values()), n_levels=spec.sweep_levels,
                                        span_sd=spec.sweep_span_sd)
            spec.boosts = {str(k): [float(x) for x in levels] for k in spec.latents}
    spec.environment = environment_of(eng)
    spec.resolved = True
    return spec


def draw_random_sets(spec: ExperimentSpec, det_members: list[int], d_sae: int, dead=None) -> None:
    """The random-ablation control: per seed, as many live latents as the detector group has
    (26, the paper's count, without one), never a detector or a distractor."""
    k = len(det_members) or 26
    live = np.ones(d_sae, dtype=bool)
    if dead is not None:
        live &= ~np.asarray(dead, dtype=bool)
    live[list(det_members)] = False
    live[spec.latents] = False
    pool = np.flatnonzero(live)
    spec.random_sets = {}
    if len(pool) < k:
        spec.skipped_conditions["random_ablation"] = f"only {len(pool)} live latents to draw {k} from"
        return
    for s in spec.random_ablation_seeds:
        rng = np.random.default_rng([int(s), 7919])
        spec.random_sets[str(s)] = sorted(int(x) for x in rng.choice(pool, size=k, replace=False))


def prepare_run(spec: ExperimentSpec, run_dir: str | Path, resume: bool = False) -> tuple[ExperimentSpec, Path]:
    """The spec to use for ``run_dir``: the saved one when resuming, else the given one."""
    run_dir = Path(run_dir)
    saved = run_dir / SPEC_FILE
    if saved.exists():
        if not resume:
            raise BadInput(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        return ExperimentSpec.load(saved), run_dir
    spec.validate()
    if not spec.name:
        spec.name = run_dir.name
    return spec, run_dir


def run_experiment(spec: ExperimentSpec, run_dir: str | Path, **kw) -> dict:
    """Run (or resume) an experiment in ``run_dir``; returns the final progress record.

    ``judge=False`` only generates (judging is left for a later resume). ``stop_after``
    stops after that many newly generated trials (whole batches; used by tests and the CLI's
    ``--limit``). Raises :class:`Cancelled` when cancelled; everything finished is on disk.
    One writer at a time: a folder another session is running raises :class:`RunLocked`. A
    new run that fails before its spec is saved leaves no folder behind.
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        with run_lock(run_dir):
            return _run(spec, run_dir, **kw)
    except BaseException:
        if created and run_dir.is_dir() and not (run_dir / SPEC_FILE).exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _run(spec: ExperimentSpec, run_dir: Path, *, engine=None, judge_fn=None,
         resume: bool = False, judge: bool = True, progress: Progress | None = None,
         cancel: CancelLike = None, stop_after: int | None = None,
         finalize_at_end: bool = True, executor=None) -> dict:
    spec, run_dir = prepare_run(spec, run_dir, resume)
    prog = RunProgress(run_dir, progress)
    judge_fn = judge_fn or (make_judge(spec) if judge else None)
    held = {"eng": None}

    def eng_fn():
        if held["eng"] is None:
            held["eng"] = engine_for(spec, engine)
        return held["eng"]

    ex = executor or InProcessExecutor(eng_fn)
    try:
        if not spec.resolved:
            spec = resolve_spec(spec, eng_fn(), judge_fn or make_judge(spec), progress=prog, cancel=cancel,
                                calibrate=ex.calibrate)
            atomic_write_json(run_dir / SPEC_FILE, spec.to_dict())
        else:
            check_same_sae(spec, engine)
            if not (run_dir / SPEC_FILE).exists():
                atomic_write_json(run_dir / SPEC_FILE, spec.to_dict())
        return _generate_and_judge(spec, run_dir, ex, eng_fn, judge_fn, judge, prog, cancel, stop_after,
                                   finalize_at_end)
    finally:
        ex.close()


def _generate_and_judge(spec, run_dir, ex, eng_fn, judge_fn, judge, prog, cancel, stop_after, finalize_at_end):
    """Hand the pending batches to the executor and log what comes back (the driver alone writes)."""
    prompts = {p["id"]: p["prompt"] for p in load_prompts()}
    trials = plan_trials(spec)
    for log_file in (GEN_FILE, TRIALS_FILE):
        seal_log(run_dir / log_file)
    gens = {r["key"]: r for r in read_jsonl(run_dir / GEN_FILE) if "key" in r}
    judged = {r["key"] for r in read_jsonl(run_dir / TRIALS_FILE) if "key" in r}
    total = len(trials)
    new_gen = 0
    started = time.time()
    speed = {"tokens": 0, "seconds": 0.0}
    done_count = sum(1 for t in trials if t.key in judged) if judge else sum(1 for t in trials if t.key in gens)
    prog("generate", done_count, total, f"{len(gens)} generated, {len(judged)} judged", force=True)
    jobs = []
    for bi, batch in enumerate(batches(trials, spec.batch_size)):
        if any(t.key not in gens for t in batch):
            jobs.append(BatchJob(bi, batch, None, judge))
        elif judge and any(t.key not in judged for t in batch):
            jobs.append(BatchJob(bi, batch, [gens[t.key] for t in batch], True))
    if "device" not in spec.environment and any(j.generated is None for j in jobs) and ex.name == "in-process":
        spec.environment = {**environment_of(eng_fn()), **spec.environment}  # a plan from another run (--like)
        atomic_write_json(run_dir / SPEC_FILE, spec.to_dict())

    def stop(msg: str):
        prog("cancelled", done_count, total, "cancelled", force=True)
        raise Cancelled(msg)

    if jobs and not is_cancelled(cancel) and not (stop_after is not None and stop_after <= 0):
        for res in ex.run(spec, jobs, prompts, judge_fn, cancel):
            if res.cancelled:
                stop(f"Experiment cancelled after {done_count} of {total} trials; resume to continue")
            if res.environment and "device" not in spec.environment:
                spec.environment = {**res.environment, **spec.environment}
                atomic_write_json(run_dir / SPEC_FILE, spec.to_dict())
            if res.generated:
                speed["tokens"] += res.generated[0]["batch_tokens"]
                speed["seconds"] += res.generated[0]["batch_s"]
            for r in res.generated:
                if r["key"] not in gens:  # a retried batch never logs a trial twice
                    append_jsonl(run_dir / GEN_FILE, r)
                    gens[r["key"]] = r
                    new_gen += 1
                    if not judge:
                        done_count += 1
            for r in res.judged:
                if r["key"] not in judged:
                    append_jsonl(run_dir / TRIALS_FILE, r)
                    judged.add(r["key"])
                    done_count += 1
            prog("generate" if not judge else "generate+judge", done_count, total,
                 f"batch {res.batch_id + 1} ({res.worker}): {_rate_text(speed)}")
            if is_cancelled(cancel):
                stop(f"Experiment cancelled after {done_count} of {total} trials; resume to continue")
            if stop_after is not None and new_gen >= stop_after:
                break
    finished = all(t.key in (judged if judge else gens) for t in trials)
    if finalize_at_end:
        prog("finalize", done_count, total, "writing trials.parquet and summary.json", force=True)
        finalize(run_dir)
    final = {"stage": "done" if finished else "partial", "done": done_count, "total": total,
             "elapsed_s": round(time.time() - started, 1), "new_generations": new_gen,
             "executor": ex.name, "message": "complete" if finished else "stopped early; resume to continue"}
    atomic_write_json(run_dir / PROGRESS_FILE, dict(final, eta_s=0 if finished else None, updated=time.time()))
    prog(final["stage"], done_count, total, final["message"])
    return final


def _rate_text(speed: dict) -> str:
    if speed["seconds"] <= 0:
        return "resumed (already generated)"
    return f"{speed['tokens'] / speed['seconds']:.1f} tokens/s"


def check_same_sae(spec: ExperimentSpec, engine) -> None:
    if engine is None:
        return

    if spec.sae_weights_hash and sae_weights_hash(engine.sae) != spec.sae_weights_hash:
        raise BadInput("This run was made with another SAE (weights differ); start a new run instead of resuming")
    engine_for(spec, engine)  # the same dtype too


def make_executor(name: str | None, address: str | None = None, workers: int | None = None,
                  gpus_per_worker: float | None = None, threads: int | None = None):
    """The executor called ``name`` for :func:`run_experiment`: None for "in-process" (this
    process, the default) or a Ray executor for "ray" (which the run closes when it ends)."""
    if name in (None, "", "in-process"):
        return None
    if name == "ray":
        from esr_core.experiments.ray_executor import RayExecutor  # heavy: ray, only when asked for

        return RayExecutor(address=address, workers=workers, gpus_per_worker=gpus_per_worker, threads=threads)
    raise BadInput(f"Unknown executor '{name}': choose one of {', '.join(EXECUTORS)}")


def ray_available() -> bool:
    """Whether the Ray executor can be offered (the ``cluster`` extra is installed)."""
    return importlib.util.find_spec("ray") is not None


def start_run_job(spec: ExperimentSpec, run_dir: str | Path, resume: bool = False, engine=None,
                  executor=None) -> BackgroundJob:
    """A run in a worker thread (the app): progress in memory and on disk, real cancel; a
    cancelled run is finalised so its summary covers what was finished. ``executor``: see
    :func:`make_executor` (None: in this process)."""
    run_dir = Path(run_dir)

    def on_cancel() -> None:
        if (run_dir / SPEC_FILE).exists():
            finalize(run_dir)

    return BackgroundJob(f"experiment-{run_dir.name}", lambda progress, cancel: run_experiment(
        spec, run_dir, resume=resume, engine=engine, progress=progress, cancel=cancel, executor=executor),
        on_cancel=on_cancel,
        run_dir=run_dir, title=spec.name).start()


GEN_FIELDS = ("key", "condition", "latent", "prompt_id", "seed", "boost", "level", "rep", "ablation_seed",
              "meta_variant", "prompt", "prompt_sent", "response", "n_tokens", "stop_reason", "batch_id",
              "batch_size", "batch_tokens", "batch_s")


def rejudge(run_dir: str | Path, out_dir: str | Path | None = None, judge_fn=None,
            progress: Progress | None = None, cancel: CancelLike = None) -> dict:
    """Judge a run's responses again (a new judge or judge version) into ``out_dir``.

    The generations are copied unchanged (from the logs, or from ``trials.parquet`` for a
    shipped run), ``spec.json`` records the new judge id, and the new judgements are appended
    per trial like a normal run, so an interrupted re-judge resumes. Default ``out_dir``:
    ``<run_dir>-rejudged`` next to a user run, or the user cache for a shipped run.
    """
    src = Path(run_dir)
    spec = load_spec(src)
    if out_dir is None:
        out_dir = default_run_dir(spec.name + "-rejudged") if src == REFERENCE_DIR else \
            src.with_name(src.name + "-rejudged")
    out = Path(out_dir)
    judge_fn = judge_fn or make_judge(spec)
    if not (out / SPEC_FILE).exists():
        df = load_trials(src)
        out.mkdir(parents=True, exist_ok=True)
        for r in df.to_dict(orient="records"):
            g = {k: (None if isinstance(r.get(k), float) and math.isnan(r[k]) else r.get(k)) for k in GEN_FIELDS}
            append_jsonl(out / GEN_FILE, g)
        spec.judge_id = str(getattr(judge_fn, "judge_id", spec.judge))
        spec.environment = dict(spec.environment, rejudged_from=str(src))
        atomic_write_json(out / SPEC_FILE, spec.to_dict())
    return run_experiment(spec, out, resume=True, judge_fn=judge_fn, progress=progress, cancel=cancel)
