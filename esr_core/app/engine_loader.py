"""Loading a model and its SAE in the background, shared by every browser session.

Why: the first load with an empty cache de-quantises the model (tens of seconds on CPU); a page
that waited for it would stay blank. The app asks for a load, draws what needs no model at
once (Home), and shows this job's progress where a model is needed. One job per (model, SAE)
per process: a second session asking for the same pair follows the same job.
"""

from __future__ import annotations

import threading

from esr_core.errors import EsrError
from esr_core.jobs import BackgroundJob, Cancel, Progress, report
from esr_core.models.loading import check_model, load_model
from esr_core.models.registry import default_sae_spec
from esr_core.models.sae import load_sae
from esr_core.paths import cache_dir

_JOBS: dict[tuple[str, str], BackgroundJob] = {}
_LOCK = threading.Lock()


def _first_load(model: str) -> bool:
    """True when the model has no de-quantised copy in the cache yet (the slow first load)."""
    return not (cache_dir() / "models" / model / "config.json").exists()


def _load(model: str, sae: str, progress: Progress, cancel: Cancel):
    from esr_core.steering.engines import get_engine, loaded_engines  # heavy: pulls torch

    if (model, sae) in loaded_engines():
        return get_engine(model, sae)
    report(progress, "loading", 1, 4, f"reading the SAE {sae}")
    load_sae(sae)
    check_model(model)
    slow = " (first time: de-quantising the model into the cache, ~30 s)" if _first_load(model) else ""
    report(progress, "loading", 2, 4, f"loading {model}{slow}")
    load_model(model)
    report(progress, "loading", 3, 4, "attaching the SAE to the model")
    eng = get_engine(model, sae)
    report(progress, "loading", 4, 4, "ready")
    return eng


def request(model: str, sae: str | None = None) -> BackgroundJob:
    """The load job for (model, SAE): started on first request, finished or running after.

    A failed job stays failed (its error is shown) until :func:`forget_failed`; a finished one
    whose engine was released to free memory is started again.
    """
    sae = sae or default_sae_spec(model)
    key = (model, str(sae))
    with _LOCK:
        job = _JOBS.get(key)
        stale = job is not None and not job.running and not job.error and getattr(job.result, "closed", False)
        if job is None or stale:
            job = BackgroundJob(f"load-{model}", lambda progress, cancel: _load(model, str(sae), progress, cancel),
                                model=model, sae=str(sae))
            _JOBS[key] = job.start()
        return job


def forget_failed(model: str, sae: str | None = None) -> None:
    """Let the next request try a failed load again."""
    key = (model, str(sae or default_sae_spec(model)))
    with _LOCK:
        job = _JOBS.get(key)
        if job is not None and not job.running and job.error:
            del _JOBS[key]


def ready_engine(model: str, sae: str | None = None):
    """The loaded engine for (model, SAE), or None while it loads; raises the load's error."""
    job = request(model, sae)
    if job.running:
        return None
    if job.error:
        raise EsrError(job.error)
    return job.result
