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

import json
import logging
import math
import platform
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from esr_core.io import append_jsonl, atomic_write_bytes, atomic_write_json, read_jsonl
from esr_core.errors import BadInput, Cancelled, EsrError
from esr_core.experiments.spec import (GROUP_PREFIX, ExperimentSpec, Trial, batches, meta_text, meta_variant_of,
                              plan_trials)
from esr_core.paths import ASSETS_DIR, cache_subdir

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
GEN_FILE = "generations.jsonl"
TRIALS_FILE = "trials.jsonl"
PARQUET_FILE = "trials.parquet"
SUMMARY_FILE = "summary.json"
PROGRESS_FILE = "progress.json"
REFERENCE_DIR = ASSETS_DIR / "experiments" / "reference"
MODEL_PARAMS = {"smollm2-135m-instruct": 135e6, "gemma3-270m": 270e6, "llama-3.1-8b-instruct": 8e9,
                "gemma-2-2b-it": 2.6e9}

TRIAL_COLUMNS = ["key", "prompt_id", "prompt", "latent", "latent_label", "boost", "boost_norm", "boost_sd",
                 "level", "condition", "meta_variant", "ablation_seed", "seed", "response", "n_tokens",
                 "stop_reason", "attempts", "n_attempts", "first_score", "last_score", "degraded", "error",
                 "judge_id"]

ProgressFn = Callable[[dict], None]


# ------------------------------------------------------------------------------ locations

def experiments_root() -> Path:
    return cache_subdir("experiments")


def default_run_dir(name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "run"
    return experiments_root() / safe


def shipped_run_dirs() -> list[Path]:
    """Runs shipped in assets/experiments: the reference run first, then the others by name."""
    base = REFERENCE_DIR.parent
    others = sorted(p for p in base.iterdir() if p != REFERENCE_DIR and (p / SPEC_FILE).exists()) \
        if base.is_dir() else []
    return ([REFERENCE_DIR] if (REFERENCE_DIR / SPEC_FILE).exists() else []) + others


def list_runs(root: str | Path | None = None, include_reference: bool = True) -> list[dict]:
    """Runs under ``root`` (default: the user cache) plus the shipped runs (reference first)."""
    dirs = []
    shipped = shipped_run_dirs() if include_reference else []
    dirs += shipped
    base = Path(root) if root else experiments_root()
    if base.is_dir():
        dirs += sorted((p for p in base.iterdir() if (p / SPEC_FILE).exists()),
                       key=lambda p: p.stat().st_mtime, reverse=True)
    out = []
    for d in dirs:
        info = {"dir": str(d), "name": d.name, "reference": d == REFERENCE_DIR, "shipped": d in shipped}
        try:
            spec = json.loads((d / SPEC_FILE).read_text(encoding="utf-8"))
            info.update(name=spec.get("name") or d.name, model=spec.get("model"),
                        conditions=spec.get("conditions"))
        except (OSError, ValueError):
            info["error"] = "unreadable spec.json"
        prog = read_progress(d)
        info["stage"] = prog.get("stage", "")
        info["done"] = prog.get("done")
        info["total"] = prog.get("total")
        info["trials"] = _count_lines(d / TRIALS_FILE) if (d / TRIALS_FILE).exists() else _parquet_rows(d)
        out.append(info)
    return out


def _count_lines(p: Path) -> int:
    return len(read_jsonl(p))


def _parquet_rows(d: Path) -> int:
    p = d / PARQUET_FILE
    if not p.exists():
        return 0
    try:
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(p).metadata.num_rows)
    except Exception:
        return 0


def read_progress(run_dir: str | Path) -> dict:
    try:
        return json.loads((Path(run_dir) / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


class _Progress:
    """Progress with an ETA, to a callback and to ``progress.json`` (for other processes)."""

    def __init__(self, run_dir: Path, fn: ProgressFn | None):
        self.run_dir, self.fn = run_dir, fn
        self.t0 = time.time()
        self.stage_t0 = self.t0
        self.stage = ""
        self.start_done = 0
        self.last_write = 0.0

    def __call__(self, stage: str, done: int, total: int, message: str = "", force: bool = False) -> None:
        now = time.time()
        if stage != self.stage:
            self.stage, self.stage_t0, self.start_done = stage, now, done
        made = done - self.start_done
        el = now - self.stage_t0
        eta = (el / made) * (total - done) if made > 0 and total > done else (0.0 if total and done >= total else None)
        info = {"stage": stage, "done": int(done), "total": int(total), "eta_s": eta,
                "elapsed_s": round(now - self.t0, 1), "message": message, "updated": now}
        if self.fn is not None:
            self.fn(info)
        if force or now - self.last_write > 1.0 or done >= total:
            self.last_write = now
            try:
                atomic_write_json(self.run_dir / PROGRESS_FILE, info)
            except OSError:
                pass


# ------------------------------------------------------------------------------ resolving the spec

def _engine_for(spec: ExperimentSpec, engine=None):
    if engine is not None:
        return engine
    from esr_core.steering.engine import get_engine

    return get_engine(spec.model, spec.sae)


def _catalog(engine, build: bool):
    from esr_core.latents.catalog import catalog_for, load_catalog_for_names

    try:
        cat = load_catalog_for_names(engine.model.name, engine.sae)
    except EsrError:
        cat = None
    if cat is None and build:
        cat = catalog_for(engine.model, engine.sae)
    return cat


def _norm_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(name).strip().lower())


def _find_group(name: str):
    """A latent group by built-in name or file stem (spaces and underscores alike), saved user
    group, or JSON file path; None when it does not exist."""
    from esr_core.latents.groups import groups_from_json, load_builtin_groups

    p = Path(name)
    if p.suffix == ".json" and p.exists():
        gs = groups_from_json(p.read_text(encoding="utf-8"))
        return gs[0] if gs else None
    user = cache_subdir("groups") / f"{name}.json"
    if user.exists():
        gs = groups_from_json(user.read_text(encoding="utf-8"))
        if gs:
            return gs[0]
    want = _norm_name(name)
    groups, _errors = load_builtin_groups()
    for g in groups:
        if _norm_name(g.name) == want or _norm_name(Path(str(g.extra.get("file", ""))).stem) == want:
            return g
    return None


def resolve_spec(spec: ExperimentSpec, engine=None, judge_fn=None, progress: _Progress | None = None,
                 cancel: threading.Event | None = None, catalog=None) -> ExperimentSpec:
    """Fill in everything a trial needs (idempotent: a resolved spec is returned as is)."""
    if spec.resolved:
        return spec
    from esr_core.experiments.boost import boost_sweep_levels
    from esr_core.latents.catalog import sae_weights_hash
    from esr_core.judge.prompts import load_prompts

    spec.validate()
    eng = _engine_for(spec, engine)
    spec.hook = eng.hook_name
    spec.sae_key = eng.sae.key
    spec.sae_weights_hash = sae_weights_hash(eng.sae)
    spec.median_norm = float(eng.median_norm)
    judge_fn = judge_fn or _judge(spec)
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
        from esr_core.experiments.distractors import select_distractors

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
                from esr_core.experiments.distractors import clean_label

                label = clean_label(cat.description(lat))
            spec.latent_labels[str(lat)] = label or f"latent #{lat}"
    # each latent's prompts: a seeded sample of the pool
    for lat in spec.latents:
        rng = np.random.default_rng([spec.base_seed, lat])
        k = min(spec.prompts_per_latent, len(spec.prompt_ids))
        idx = sorted(rng.choice(len(spec.prompt_ids), size=k, replace=False).tolist())
        spec.latent_prompts[str(lat)] = [spec.prompt_ids[i] for i in idx]
    dec = eng._dec_norm.detach().cpu().numpy() if hasattr(eng, "_dec_norm") else \
        eng.sae.W_dec.detach().float().norm(dim=1).cpu().numpy()
    spec.dec_norms = {str(lat): float(dec[lat]) for lat in spec.latents}
    # ablation sets
    conds = list(spec.conditions)
    det_members: list[int] = []
    if "detector_ablation" in conds or "random_ablation" in conds:
        g = _find_group(spec.detector_group)
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
            g = _find_group(name)
            if g is None:
                spec.skipped_conditions[c] = f"latent group '{name}' not found"
            else:
                g.check(eng.sae.d_sae)
                spec.groups[c] = [int(m) for m in g.members]
    if "random_ablation" in conds:
        k = len(det_members) or 26  # the paper's detector count when no group is there
        live = np.ones(eng.sae.d_sae, dtype=bool)
        if cat is not None:
            live &= ~np.asarray(cat.dead, dtype=bool)
        elif need_catalog:
            log.info("no catalog: random ablation sets are drawn from all latents")
        live[det_members] = False
        live[spec.latents] = False
        pool = np.flatnonzero(live)
        if len(pool) < k:
            spec.skipped_conditions["random_ablation"] = f"only {len(pool)} live latents to draw {k} from"
        else:
            for s in spec.random_ablation_seeds:
                rng = np.random.default_rng([int(s), 7919])
                spec.random_sets[str(s)] = sorted(int(x) for x in rng.choice(pool, size=k, replace=False))
    # boosts
    if spec.boost_mode == "fixed":
        for lat in spec.latents:
            raw = float(spec.boost) if spec.boost_units == "raw" else \
                float(spec.boost) * spec.median_norm / max(spec.dec_norms[str(lat)], 1e-12)
            spec.boosts[str(lat)] = [raw]
    else:
        cal = calibrate_latents(spec, eng, judge_fn, prompts, progress=progress, cancel=cancel)
        if cancel is not None and cancel.is_set():
            raise Cancelled("Experiment cancelled during boost calibration")
        spec.calibration = {str(k): v for k, v in cal.items()}
        spec.thresholds = {str(k): float(v["boost_raw"]) for k, v in cal.items()}
        if spec.boost_mode == "calibrate":
            spec.boosts = {str(k): [spec.thresholds[str(k)]] for k in spec.latents}
        else:
            levels = boost_sweep_levels(list(spec.thresholds.values()), n_levels=spec.sweep_levels,
                                        span_sd=spec.sweep_span_sd)
            spec.boosts = {str(k): [float(x) for x in levels] for k in spec.latents}
    spec.environment = _environment(eng)
    spec.resolved = True
    return spec


def _environment(eng) -> dict:
    import torch

    dev = str(getattr(eng, "device", "cpu"))
    env = {"device": dev, "torch": torch.__version__, "python": platform.python_version(),
           "host_cpus": __import__("os").cpu_count()}
    if dev.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def _judge(spec: ExperimentSpec):
    from esr_core.judge.scoring import get_judge

    return get_judge(spec.judge)


# ------------------------------------------------------------------------------ calibration

class _Broker:
    """Lets one bisection thread per latent ask for scores while one thread batches them all.

    Why: probabilistic bisection is sequential per latent, but the model is much faster on a
    batch; each round gathers one query from every live latent into one generate_batch.
    """

    def __init__(self, n_clients: int):
        self.cv = threading.Condition()
        self.alive = n_clients
        self.pending: list[tuple[Any, dict]] = []

    def ask(self, req):
        slot: dict = {"done": False}
        with self.cv:
            self.pending.append((req, slot))
            self.cv.notify_all()
            while not slot["done"]:
                self.cv.wait()
        if "error" in slot:
            raise slot["error"]
        return slot["result"]

    def leave(self) -> None:
        with self.cv:
            self.alive -= 1
            self.cv.notify_all()

    def serve(self, handle: Callable[[list], list]) -> None:
        while True:
            with self.cv:
                while self.alive > 0 and len(self.pending) < self.alive:
                    self.cv.wait(timeout=0.5)
                if self.alive <= 0 and not self.pending:
                    return
                batch, self.pending = self.pending, []
            try:
                results = handle([r for r, _ in batch])
                err = None
            except BaseException as exc:  # hand the error to every waiting client
                results, err = [None] * len(batch), exc
            with self.cv:
                for (_, slot), res in zip(batch, results):
                    if err is not None:
                        slot["error"] = err
                    else:
                        slot["result"] = res
                    slot["done"] = True
                self.cv.notify_all()


def _calib_settings(spec: ExperimentSpec) -> dict:
    return {"steps": spec.calib_steps, "prompts": spec.calib_prompts, "lo_norm": spec.calib_lo,
            "hi_norm": spec.calib_hi, "max_new_tokens": spec.calib_tokens(), "temperature": spec.temperature,
            "repetition_penalty": spec.repetition_penalty, "base_seed": spec.base_seed}


def calibrate_latents(spec: ExperimentSpec, eng, judge_fn, prompts: dict[str, str],
                      progress: _Progress | None = None, cancel: threading.Event | None = None,
                      cache=None) -> dict[int, dict]:
    """Per-latent boost at which the mean first-attempt score reaches ``calib_target``.

    Bisection runs in norm units (boost x median residual norm along the unit decoder
    direction, so priors transfer between latents and models) and is stored in raw units
    too. Cached by (model, SAE, hook, latent, target, judge); a cached value is reused only
    when it was made with the same calibration settings.
    """
    from esr_core.experiments.boost import CalibrationCache, probabilistic_bisection
    from esr_core.steering.spec import GenerationSpec
    from esr_core.steering.interventions import Intervention

    cache = cache or CalibrationCache()
    settings = _calib_settings(spec)
    out: dict[int, dict] = {}
    todo = []
    for lat in spec.latents:
        key = cache.key(spec.model, spec.sae_key, spec.hook, lat, spec.calib_target, spec.judge_id)
        hit = cache.get(key)
        if hit and hit.get("settings") == settings and hit.get("sae_weights_hash") == spec.sae_weights_hash:
            out[lat] = hit
        else:
            todo.append((lat, key))
    total = len(todo) * max(spec.calib_steps, 1)
    state = {"done": 0}
    if progress:
        progress("calibrate", 0, total, f"calibrating {len(todo)} latents ({len(out)} cached)", force=True)
    if not todo:
        return out
    broker = _Broker(len(todo))
    stop = (lambda: cancel.is_set()) if cancel is not None else None
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def client(lat: int, key):
        try:
            pids = spec.latent_prompts[str(lat)][:spec.calib_prompts]

            def score_fn(b_norm: float) -> float | None:
                return broker.ask((lat, float(b_norm), pids))

            def on_step(_s):
                state["done"] += 1
                if progress:
                    progress("calibrate", state["done"], total, f"latent {lat}")

            res = probabilistic_bisection(score_fn, spec.calib_lo, spec.calib_hi, target=spec.calib_target,
                                          steps=spec.calib_steps, rng=lat, cancel=stop, on_step=on_step)
            results[lat] = res
        except BaseException as exc:
            errors.append(exc)
        finally:
            broker.leave()

    def handle(reqs: list) -> list:
        if cancel is not None and cancel.is_set():
            return [None] * len(reqs)
        rows = []
        for ri, (lat, b_norm, pids) in enumerate(reqs):
            raw = b_norm * spec.median_norm / max(spec.dec_norms[str(lat)], 1e-12)
            for pj, pid in enumerate(pids):
                rows.append((ri, pid, GenerationSpec(
                    prompt=prompts[pid], interventions=[Intervention(latent=lat, mode="add", strength=raw,
                                                                     units="raw", positions="all")],
                    watch=[lat], top_k=0, temperature=spec.temperature,
                    repetition_penalty=spec.repetition_penalty, max_new_tokens=spec.calib_tokens(),
                    seed=_calib_seed(spec, lat, pid), runs=("steered",))))
        texts = []
        for s in range(0, len(rows), spec.batch_size):
            chunk = rows[s:s + spec.batch_size]
            res = eng.generate_batch([r[2] for r in chunk], cancel=cancel)
            texts += [r["steered"].text for r in res]
        scores: list[list[float]] = [[] for _ in reqs]
        for (ri, pid, _), text in zip(rows, texts):
            lat = reqs[ri][0]
            j = judge_fn(prompts[pid], text, spec.latent_labels.get(str(lat)))
            atts = [a for a in (j.get("attempts") or []) if a.get("score") is not None]
            scores[ri].append(float(atts[0]["score"]) if atts else 0.0)  # no answer = failed task
        return [float(np.mean(s)) if s else None for s in scores]

    threads = [threading.Thread(target=client, args=(lat, key), daemon=True) for lat, key in todo]
    for t in threads:
        t.start()
    broker.serve(handle)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for lat, key in todo:
        res = results.get(lat)
        if res is None:
            continue
        d = res.to_dict()
        d["boost_norm"] = float(res.boost)
        d["boost_raw"] = float(res.boost) * spec.median_norm / max(spec.dec_norms[str(lat)], 1e-12)
        d["settings"] = settings
        d["sae_weights_hash"] = spec.sae_weights_hash
        if not res.cancelled:
            cache.put(key, d)
        out[lat] = d
    return out


def _calib_seed(spec: ExperimentSpec, lat: int, pid: str) -> int:
    import zlib

    return zlib.crc32(f"calib|{spec.base_seed}|{lat}|{pid}".encode()) & 0x7FFFFFFF


# ------------------------------------------------------------------------------ running

def _interventions(spec: ExperimentSpec, t: Trial):
    from esr_core.steering.interventions import Intervention

    ivs = []
    if t.condition != "no_steering":
        ivs.append(Intervention(latent=t.latent, mode="add", strength=float(t.boost), units="raw", positions="all"))
    members: list[int] = []
    if t.condition == "detector_ablation" or t.condition.startswith(GROUP_PREFIX):
        members = spec.groups.get(t.condition, [])
    elif t.condition == "random_ablation":
        members = spec.random_sets.get(str(t.ablation_seed), [])
    for m in members:
        if int(m) != t.latent:
            ivs.append(Intervention(latent=int(m), mode="ablate", strength=0.0, units="raw", positions="all"))
    return ivs


def _prompt_for(spec: ExperimentSpec, t: Trial, base: str) -> tuple[str, str | None]:
    v = meta_variant_of(t.condition, spec)
    if v is None:
        return base, None
    return f"{base} {meta_text(v, spec.latent_labels.get(str(t.latent), ''))}", v


def boost_norm_of(spec: ExperimentSpec, latent: int, raw: float) -> float:
    return float(raw) * spec.dec_norms.get(str(latent), 1.0) / spec.median_norm if spec.median_norm else math.nan


def _strip_judgement(j: dict) -> list[dict]:
    out = []
    for a in j.get("attempts") or []:
        out.append({k: a[k] for k in ("attempt_text", "score", "start_char", "end_char") if k in a})
    return out


def prepare_run(spec: ExperimentSpec, run_dir: str | Path, resume: bool = False) -> tuple[ExperimentSpec, Path]:
    """The spec to use for ``run_dir``: the saved one when resuming, else the given one."""
    run_dir = Path(run_dir)
    saved = run_dir / SPEC_FILE
    if saved.exists():
        if not resume:
            raise BadInput(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        return ExperimentSpec.load(saved), run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if not spec.name:
        spec.name = run_dir.name
    return spec, run_dir


def run_experiment(spec: ExperimentSpec, run_dir: str | Path, *, engine=None, judge_fn=None,
                   resume: bool = False, judge: bool = True, progress: ProgressFn | None = None,
                   cancel: threading.Event | None = None, stop_after: int | None = None,
                   finalize_at_end: bool = True) -> dict:
    """Run (or resume) an experiment in ``run_dir``; returns the final progress record.

    ``judge=False`` only generates (judging is left for a later resume). ``stop_after``
    stops after that many newly generated trials (whole batches; used by tests and the CLI's
    ``--limit``). Raises :class:`Cancelled` when cancelled; everything finished is on disk.
    """
    spec, run_dir = prepare_run(spec, run_dir, resume)
    prog = _Progress(run_dir, progress)
    judge_fn = judge_fn or (_judge(spec) if judge else None)
    eng = None
    if not spec.resolved:
        eng = _engine_for(spec, engine)
        spec = resolve_spec(spec, eng, judge_fn or _judge(spec), progress=prog, cancel=cancel)
        atomic_write_json(run_dir / SPEC_FILE, spec.to_dict())
    else:
        _check_same_sae(spec, engine)
        if not (run_dir / SPEC_FILE).exists():
            atomic_write_json(run_dir / SPEC_FILE, spec.to_dict())
    from esr_core.judge.prompts import load_prompts

    prompts = {p["id"]: p["prompt"] for p in load_prompts()}
    trials = plan_trials(spec)
    for log_file in (GEN_FILE, TRIALS_FILE):
        _seal_log(run_dir / log_file)
    gens = {r["key"]: r for r in read_jsonl(run_dir / GEN_FILE) if "key" in r}
    judged = {r["key"] for r in read_jsonl(run_dir / TRIALS_FILE) if "key" in r}
    total = len(trials)
    new_gen = 0
    started = time.time()
    speed = {"tokens": 0, "seconds": 0.0}
    done_count = sum(1 for t in trials if t.key in judged) if judge else sum(1 for t in trials if t.key in gens)
    prog("generate", done_count, total, f"{len(gens)} generated, {len(judged)} judged", force=True)
    for bi, batch in enumerate(batches(trials, spec.batch_size)):
        if cancel is not None and cancel.is_set():
            prog("cancelled", done_count, total, "cancelled", force=True)
            raise Cancelled(f"Experiment cancelled after {done_count} of {total} trials; resume to continue")
        if stop_after is not None and new_gen >= stop_after:
            break
        if any(t.key not in gens for t in batch):
            if eng is None:
                eng = _engine_for(spec, engine)
            recs = _generate_batch(spec, eng, batch, prompts, bi, cancel)
            if recs:
                speed["tokens"] += recs[0]["batch_tokens"]
                speed["seconds"] += recs[0]["batch_s"]
            if recs is None:
                prog("cancelled", done_count, total, "cancelled", force=True)
                raise Cancelled(f"Experiment cancelled after {done_count} of {total} trials; resume to continue")
            for r in recs:
                if r["key"] not in gens:
                    append_jsonl(run_dir / GEN_FILE, r)
                    gens[r["key"]] = r
                    new_gen += 1
                    if not judge:
                        done_count += 1
        if judge:
            for t in batch:
                if t.key in judged:
                    continue
                append_jsonl(run_dir / TRIALS_FILE, judge_record(spec, gens[t.key], judge_fn))
                judged.add(t.key)
                done_count += 1
        prog("generate" if not judge else "generate+judge", done_count, total,
             f"batch {bi + 1}: {_rate_text(speed)}")
    finished = all(t.key in (judged if judge else gens) for t in trials)
    if finalize_at_end:
        prog("finalize", done_count, total, "writing trials.parquet and summary.json", force=True)
        finalize(run_dir)
    final = {"stage": "done" if finished else "partial", "done": done_count, "total": total,
             "elapsed_s": round(time.time() - started, 1), "new_generations": new_gen,
             "message": "complete" if finished else "stopped early; resume to continue"}
    atomic_write_json(run_dir / PROGRESS_FILE, dict(final, eta_s=0 if finished else None, updated=time.time()))
    if progress:
        progress(final)
    return final


def _seal_log(path: Path) -> None:
    """End a torn last line (crash mid-write) with a newline so the next record starts clean."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, 2)
        if f.read(1) != b"\n":
            f.write(b"\n")
            f.flush()
            import os

            os.fsync(f.fileno())


def _rate_text(speed: dict) -> str:
    if speed["seconds"] <= 0:
        return "resumed (already generated)"
    return f"{speed['tokens'] / speed['seconds']:.1f} tokens/s"


def _check_same_sae(spec: ExperimentSpec, engine) -> None:
    if engine is None:
        return
    from esr_core.latents.catalog import sae_weights_hash

    if spec.sae_weights_hash and sae_weights_hash(engine.sae) != spec.sae_weights_hash:
        raise BadInput("This run was made with another SAE (weights differ); start a new run instead of resuming")


def _generate_batch(spec: ExperimentSpec, eng, batch: list[Trial], prompts: dict[str, str], batch_id: int,
                    cancel) -> list[dict] | None:
    """Generate one whole batch (always the same companions); None when cancelled mid-batch."""
    from esr_core.steering.spec import GenerationSpec

    gspecs, metas = [], []
    for t in batch:
        base = prompts[t.prompt_id]
        sent, variant = _prompt_for(spec, t, base)
        gspecs.append(GenerationSpec(prompt=sent, interventions=_interventions(spec, t), watch=[t.latent], top_k=0,
                                     temperature=spec.temperature, repetition_penalty=spec.repetition_penalty,
                                     max_new_tokens=spec.max_new_tokens, seed=t.seed, runs=("steered",)))
        metas.append((base, sent, variant))
    t0 = time.time()
    res = eng.generate_batch(gspecs, cancel=cancel)
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


def judge_record(spec: ExperimentSpec, g: dict, judge_fn) -> dict:
    """A generation record plus its judgement (errors are recorded, never raised)."""
    from esr_core.experiments.metrics import degraded_output, trial_flags

    rec = dict(g)
    label = spec.latent_labels.get(str(g["latent"]), "")
    rec["latent_label"] = label
    rec["boost_norm"] = boost_norm_of(spec, g["latent"], g["boost"])
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


# ------------------------------------------------------------------------------ tables and summaries

def load_spec(run_dir: str | Path) -> ExperimentSpec:
    return ExperimentSpec.load(Path(run_dir) / SPEC_FILE)


def trial_table(run_dir: str | Path, spec: ExperimentSpec | None = None) -> pd.DataFrame:
    """One row per trial (judged trials; generated-but-unjudged ones appear with no attempts)."""
    run_dir = Path(run_dir)
    spec = spec or load_spec(run_dir)
    judged = {r["key"]: r for r in read_jsonl(run_dir / TRIALS_FILE) if "key" in r}
    if not judged and not (run_dir / GEN_FILE).exists() and (run_dir / PARQUET_FILE).exists():
        return read_parquet_table(run_dir)
    rows = list(judged.values())
    for g in read_jsonl(run_dir / GEN_FILE):
        if g.get("key") in judged:
            continue
        r = dict(g)
        r.update(latent_label=spec.latent_labels.get(str(g["latent"]), ""),
                 boost_norm=boost_norm_of(spec, g["latent"], g["boost"]), attempts=None, n_attempts=None,
                 first_score=None, last_score=None, degraded=None, error=None, judge_id=None)
        rows.append(r)
        judged[g["key"]] = r
    df = pd.DataFrame(rows)
    for c in TRIAL_COLUMNS:
        if c not in df.columns:
            df[c] = None
    if len(df):
        df["boost_sd"] = _boost_sd(spec, df["boost"].astype(float).tolist())
        df["attempts"] = df["attempts"].map(lambda a: None if a is None or (isinstance(a, float) and math.isnan(a))
                                            else (a if isinstance(a, str) else json.dumps(a, ensure_ascii=False)))
        order = {t.key: i for i, t in enumerate(plan_trials(spec))} if spec.resolved else {}
        df["_o"] = df["key"].map(lambda k: order.get(k, 10**9))
        df = df.sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)
    extra = [c for c in df.columns if c not in TRIAL_COLUMNS]
    return df[TRIAL_COLUMNS + extra]


def _boost_sd(spec: ExperimentSpec, boosts: list[float]) -> list[float]:
    from esr_core.experiments.boost import levels_in_sd_units

    th = [v for v in spec.thresholds.values() if v is not None]
    if len(th) < 1:
        return [math.nan] * len(boosts)
    try:
        return levels_in_sd_units(boosts, th)
    except EsrError:
        return [math.nan] * len(boosts)


def read_parquet_table(run_dir: str | Path) -> pd.DataFrame:
    p = Path(run_dir) / PARQUET_FILE
    if not p.exists():
        raise BadInput(f"No trial table at {p}")
    return pd.read_parquet(p)


def load_trials(run_dir: str | Path) -> pd.DataFrame:
    """The run's trial table: live logs when present, else the Parquet file (shipped runs)."""
    run_dir = Path(run_dir)
    if (run_dir / TRIALS_FILE).exists() or (run_dir / GEN_FILE).exists():
        return trial_table(run_dir)
    return read_parquet_table(run_dir)


def _records(df: pd.DataFrame) -> list[dict]:
    return json.loads(df.to_json(orient="records", double_precision=6)) if len(df) else []


def summarise_run(trials: pd.DataFrame, spec: ExperimentSpec) -> dict:
    """The JSON summary: per condition, per boost level, against steering and against the paper."""
    from esr_core.experiments.metrics import compare_to_baseline, summarise
    from esr_core.experiments.paper import comparison_table

    by_cond = summarise(trials, by=("condition",)) if len(trials) else pd.DataFrame()
    by_boost = summarise(trials.assign(boost_norm=trials["boost_norm"].astype(float).round(3)),
                         by=("condition", "boost_norm")) if len(trials) else pd.DataFrame()
    comp = pd.DataFrame()
    if len(by_cond) and "steering" in set(by_cond["condition"]):
        comp = compare_to_baseline(by_cond, baseline="steering")
    paper = pd.DataFrame()
    if len(by_cond):
        paper = comparison_table(by_cond, spec.model, MODEL_PARAMS.get(spec.model, math.nan))
    planned = len(plan_trials(spec)) if spec.resolved else None
    n_per = {str(r["condition"]): int(r["n_trials"]) for _, r in by_cond.iterrows()} if len(by_cond) else {}
    dropped = {}
    for _, r in by_cond.iterrows():
        dropped[str(r["condition"])] = {k[len("n_dropped_"):]: int(r[k]) for k in r.index
                                        if k.startswith("n_dropped_") and int(r[k])}
    thr = _throughput(trials)
    out = {"name": spec.name, "model": spec.model, "sae": spec.sae or "default", "hook": spec.hook,
           "judge_id": spec.judge_id, "relevance_rule": spec.relevance_rule, "boost_mode": spec.boost_mode,
           "n_latents": len(spec.latents), "prompts_per_latent": spec.prompts_per_latent,
           "max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature,
           "repetition_penalty": spec.repetition_penalty,
           "n_trials_planned": planned, "n_trials": int(len(trials)), "complete": planned == len(trials),
           "n_per_condition": n_per, "dropped": dropped, "skipped_conditions": spec.skipped_conditions,
           "by_condition": _records(by_cond), "by_boost": _records(by_boost),
           "vs_steering": _records(comp), "paper_comparison": _records(paper), "throughput": thr,
           "environment": spec.environment}
    out["headline"] = headline(by_cond, spec)
    return out


def _throughput(trials: pd.DataFrame) -> dict:
    if not len(trials) or "batch_id" not in trials.columns:
        return {}
    b = trials.dropna(subset=["batch_id"]).drop_duplicates("batch_id")
    if not len(b):
        return {}
    tok = float(b["batch_tokens"].sum())
    sec = float(b["batch_s"].sum())
    return {"generated_tokens": int(tok), "generation_seconds": round(sec, 1),
            "tokens_per_s": round(tok / sec, 1) if sec > 0 else None, "batches": int(len(b))}


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(float(x)) else f"{100 * float(x):.1f} %"


def headline(by_cond: pd.DataFrame, spec: ExperimentSpec) -> str:
    """One honest sentence on what the numbers say about ESR for this model."""
    if by_cond is None or not len(by_cond) or "steering" not in set(by_cond["condition"]):
        return "No steered trials yet: nothing can be said about ESR for this run."
    r = by_cond[by_cond["condition"] == "steering"].iloc[0]
    params = MODEL_PARAMS.get(spec.model)
    size = f"{params / 1e6:.0f}M-parameter " if params and params < 1e9 else ""
    s = (f"Under steering the {size}{spec.model} restarted in {_pct(r['multi_attempt_rate'])} of "
         f"{int(r['n_valid'])} valid trials and improved after a restart (ESR) in {_pct(r['esr_rate'])} "
         f"(95 % Wilson {_pct(r['esr_lo'])}-{_pct(r['esr_hi'])})")
    if float(r["esr_hi"]) < 0.038:
        s += ", below the paper's 3.8 % for Llama-3.3-70B and consistent with its finding that smaller models show little or no ESR"
    elif float(r["esr_rate"]) >= 0.038:
        s += ", at or above the paper's 70B rate, which at this size more likely reflects the judge than real self-correction"
    else:
        s += "; the interval is too wide to separate it from the paper's 3.8 % (70B)"
    meta = by_cond[by_cond["condition"] == "meta_prompt"]
    if len(meta):
        m = meta.iloc[0]
        s += f". With the meta-prompt the multi-attempt rate was {_pct(m['multi_attempt_rate'])}"
    return s + "."


def finalize(run_dir: str | Path) -> dict:
    """Write ``trials.parquet`` and ``summary.json`` atomically from the logs; returns the summary."""
    run_dir = Path(run_dir)
    spec = load_spec(run_dir)
    df = trial_table(run_dir, spec)
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(run_dir / PARQUET_FILE, buf.getvalue())
    summary = summarise_run(df, spec)
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def load_summary(run_dir: str | Path, recompute: bool = False) -> dict:
    run_dir = Path(run_dir)
    p = run_dir / SUMMARY_FILE
    if p.exists() and not recompute:
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except ValueError:
            pass
    return summarise_run(load_trials(run_dir), load_spec(run_dir))


# ------------------------------------------------------------------------------ background runs

class BackgroundRun:
    """A run in a worker thread (for the app): progress in memory and on disk, real cancel."""

    def __init__(self, spec: ExperimentSpec, run_dir: str | Path, resume: bool = False, engine=None):
        self.spec, self.run_dir, self.resume, self.engine = spec, Path(run_dir), resume, engine
        self.cancel = threading.Event()
        self.progress: dict = {"stage": "starting", "done": 0, "total": 0}
        self.error: str | None = None
        self.result: dict | None = None
        self.thread = threading.Thread(target=self._work, name=f"esr-experiment-{self.run_dir.name}", daemon=True)

    def start(self) -> "BackgroundRun":
        self.thread.start()
        return self

    def _on_progress(self, p: dict) -> None:
        self.progress = dict(p)

    def _work(self) -> None:
        try:
            self.result = run_experiment(self.spec, self.run_dir, resume=self.resume, engine=self.engine,
                                         progress=self._on_progress, cancel=self.cancel)
        except Cancelled as exc:
            self.error = str(exc)
            self.progress = dict(self.progress, stage="cancelled")
            try:
                if (self.run_dir / SPEC_FILE).exists():
                    finalize(self.run_dir)
            except Exception:  # the logs are still there; the summary can be rebuilt later
                pass
        except EsrError as exc:
            self.error = str(exc)
            self.progress = dict(self.progress, stage="failed")
        except Exception as exc:  # keep the app alive; the message goes to the page
            log.exception("experiment failed")
            self.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self.progress = dict(self.progress, stage="failed")

    @property
    def running(self) -> bool:
        return self.thread.is_alive()


# ------------------------------------------------------------------------------ figures

def figures_for(trials: pd.DataFrame, spec: ExperimentSpec | None = None) -> dict:
    """The result figures of a run (name -> plotly figure); empty-safe."""
    from esr_core.experiments.metrics import summarise
    from esr_core.viz.result_plots import (condition_comparison_figure, first_last_scatter, rates_vs_boost_figure,
                               score_delta_figure)

    figs = {"score_delta": score_delta_figure(trials)}
    by_cond = summarise(trials, by=("condition",)) if len(trials) else pd.DataFrame()
    base = "steering" if len(by_cond) and "steering" in set(by_cond["condition"]) else None
    figs["condition_comparison"] = condition_comparison_figure(by_cond, baseline=base)
    x = "boost_sd" if len(trials) and "boost_sd" in trials and trials["boost_sd"].notna().any() else "boost_norm"
    if len(trials):
        t = trials.assign(**{x: trials[x].astype(float).round(3)})
        figs["rates_vs_boost"] = rates_vs_boost_figure(summarise(t, by=("condition", x)), x=x)
    else:
        figs["rates_vs_boost"] = rates_vs_boost_figure(pd.DataFrame(), x=x)
    figs["first_last"] = first_last_scatter(trials)
    return figs


def run_figures(run_dir: str | Path) -> dict:
    """The result figures, plus the correction overlay per source when ``overlay.json`` exists."""
    from esr_core.experiments.overlay import load_overlay
    from esr_core.viz.result_plots import correction_overlay_figure

    run_dir = Path(run_dir)
    figs = figures_for(load_trials(run_dir), load_spec(run_dir))
    ov = load_overlay(run_dir)
    for source in (ov or {}).get("sources", {}):
        figs[f"correction_overlay_{source}"] = correction_overlay_figure(ov, source)
    return figs


# ------------------------------------------------------------------------------ re-judging

GEN_FIELDS = ("key", "condition", "latent", "prompt_id", "seed", "boost", "level", "rep", "ablation_seed",
              "meta_variant", "prompt", "prompt_sent", "response", "n_tokens", "stop_reason", "batch_id",
              "batch_size", "batch_tokens", "batch_s")


def rejudge(run_dir: str | Path, out_dir: str | Path | None = None, judge_fn=None,
            progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> dict:
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
    judge_fn = judge_fn or _judge(spec)
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
