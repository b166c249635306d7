"""Loading a model and its SAE in the background, shared by every browser session.

Why: the first load with an empty cache de-quantises the model (tens of seconds on CPU); a page
that waited for it would stay blank. The app asks for a load, draws what needs no model at
once (Home), and shows this job's progress where a model is needed. One job per (model, SAE,
readout SAE) per process: a second session asking for the same choice follows the same job,
and two sessions with different readout SAEs never share one.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from esr_core.errors import EsrError
from esr_core.jobs import BackgroundJob, Cancel, Progress, report
from esr_core.models.loading import check_dtype, check_model, load_model
from esr_core.models.registry import default_sae_spec
from esr_core.models.sae import load_sae
from esr_core.paths import cache_dir

_JOBS: dict[tuple[str, ...], BackgroundJob] = {}
_LOCK = threading.Lock()


def _first_load(model: str) -> bool:
    """True when the model has no de-quantised copy in the cache yet (the slow first load)."""
    return not (cache_dir() / "models" / model / "config.json").exists()


def _key(model: str, sae: str | None, read_sae: str | None) -> tuple[str, ...]:
    """(model, SAE) or (model, SAE, readout SAE), as :func:`esr_core.steering.engines.engine_key`
    makes it (computed here without importing torch): a readout SAE that is the steering SAE
    itself is no readout SAE."""
    sae = str(sae or default_sae_spec(model))
    read = str(read_sae).strip() if read_sae is not None and str(read_sae).strip() else None
    if read is not None and read != sae:
        try:
            a, b = Path(sae).expanduser(), Path(read).expanduser()
            if a.exists() and b.exists() and a.resolve() == b.resolve():
                read = None
        except OSError:
            pass
    d = check_dtype(os.environ.get("ESR_LAB_DTYPE") or "float32")
    return (model, sae) + ((read,) if read is not None and read != sae else ()) + \
        (() if d == "float32" else (f"dtype:{d}",))


def _load(model: str, sae: str, read_sae: str | None, progress: Progress, cancel: Cancel):
    from esr_core.steering.engines import engine_key, get_engine, loaded_engines  # heavy: pulls torch

    if engine_key(model, sae, read_sae) in loaded_engines():
        return get_engine(model, sae, read_sae)
    report(progress, "loading", 1, 4, f"reading the SAE {sae}")
    load_sae(sae)
    if read_sae:
        report(progress, "loading", 1, 4, f"reading the readout SAE {read_sae}")
        load_sae(read_sae)
    check_model(model)
    slow = " (first time: de-quantising the model into the cache, ~30 s)" if _first_load(model) else ""
    report(progress, "loading", 2, 4, f"loading {model}{slow}")
    load_model(model, dtype=check_dtype(os.environ.get("ESR_LAB_DTYPE") or "float32"))
    report(progress, "loading", 3, 4, "attaching the SAE to the model" if not read_sae
           else "attaching the steering and readout SAEs to the model")
    eng = get_engine(model, sae, read_sae)
    report(progress, "loading", 4, 4, "ready")
    return eng


def request(model: str, sae: str | None = None, read_sae: str | None = None) -> BackgroundJob:
    """The load job for (model, SAE, readout SAE): started on first request, finished or running after.

    ``read_sae`` None (or the steering SAE itself) reads the steering SAE. A failed job stays
    failed (its error is shown) until :func:`forget_failed`; a finished one whose engine was
    released to free memory is started again.
    """
    key = _key(model, sae, read_sae)
    sae_s, read_s = key[1], (key[2] if len(key) > 2 and not key[2].startswith("dtype:") else None)
    with _LOCK:
        job = _JOBS.get(key)
        stale = job is not None and not job.running and not job.error and getattr(job.result, "closed", False)
        if job is None or stale:
            job = BackgroundJob(f"load-{model}",
                                lambda progress, cancel: _load(model, sae_s, read_s, progress, cancel),
                                model=model, sae=sae_s, **({"read_sae": read_s} if read_s else {}))
            _JOBS[key] = job.start()
        return job


def forget_failed(model: str, sae: str | None = None, read_sae: str | None = None) -> None:
    """Let the next request try a failed load again."""
    key = _key(model, sae, read_sae)
    with _LOCK:
        job = _JOBS.get(key)
        if job is not None and not job.running and job.error:
            del _JOBS[key]


def ready_engine(model: str, sae: str | None = None, read_sae: str | None = None):
    """The loaded engine for (model, SAE, readout SAE), or None while it loads; raises the load's error."""
    job = request(model, sae, read_sae)
    if job.running:
        return None
    if job.error:
        raise EsrError(job.error)
    return job.result
